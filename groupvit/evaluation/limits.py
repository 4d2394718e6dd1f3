"""The limits of one image on its way to the encoder, shared by every caller (`groupvit segment`, `groupvit evaluate`,
the classification loop, a web page): `inference_size` is the one place that resizes and bounds an image's size.

Kept free of torch so that command-line help can quote the limits without importing it.
"""
from __future__ import annotations

import math

from groupvit.errors import DataError

# The limits of one image handed to the encoder, whoever hands it (`groupvit segment`, `groupvit evaluate`, the
# classification loop, a web page). The reference settings stay far inside them (short side 448, long side capped at
# 2048: at most 448 x 2048 = 0.92 M px), so they change nothing there. At the cap a whole-image forward of the
# released model (patch 16) sees 16384 patch tokens; without a cap a 1 x 20000 px strip resized to a 448 px short
# side would be 448 x 8960000 px.
MAX_LONG_SIDE = 4096  # px, long side after resizing
MAX_PIXELS = 2048 * 2048  # px, height x width after resizing (4.2 M)
MAX_ASPECT_RATIO = 64  # long side / short side of the image; beyond it the capped short side shrinks under a patch


class ImageSizeError(DataError):
    """An image the encoder cannot take within the limits of `inference_size` (the message names the limit)."""


def inference_size(h: int, w: int, short_side: int, long_side: int, source: str = "image") -> tuple[int, int]:
    """The (height, width) an image of h x w px is resized to before the encoder.

    Keep-ratio resize so the short side is `short_side` (0 keeps the size) and the long side at most `long_side`
    (mmseg `Resize(img_scale=(long_side, short_side), keep_ratio=True)`), then the limits every caller shares: the
    result is scaled down (keeping the ratio) to at most `MAX_LONG_SIDE` (4096) px on its long side and `MAX_PIXELS`
    (2048 x 2048) px in all.

    Args:
        h, w: the image size in px.
        short_side: target short side (0 = keep the size).
        long_side: cap of the long side after the short-side resize.
        source: what the image is (a path), for the error message.

    Raises:
        ImageSizeError: an empty image, or one more elongated than `MAX_ASPECT_RATIO` (64):1, which no downscale
            can bring under the limits with a short side of at least one patch.
    """
    if h < 1 or w < 1:
        raise ImageSizeError(f"{source}: empty image ({h} x {w} px)")
    ratio = max(h, w) / min(h, w)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"{source}: {h} x {w} px (height x width) has an aspect ratio of {ratio:.0f}:1, over the "
                             f"limit of {MAX_ASPECT_RATIO}:1 for segmentation and classification; crop it into "
                             "less elongated pieces")
    scale = min(short_side / min(h, w), long_side / max(h, w)) if short_side > 0 else 1.0
    cap = min(MAX_LONG_SIDE / max(h, w), math.sqrt(MAX_PIXELS / (h * w)))
    if scale <= cap:  # every reference setting: the size mmseg computes, unchanged
        return int(h * scale + 0.5), int(w * scale + 0.5)
    return max(int(h * cap), 1), max(int(w * cap), 1)  # rounded down: never over the limits
