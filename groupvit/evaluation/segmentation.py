"""Zero-shot semantic segmentation from grouping outputs (the reference's `GroupViTSegInference`, pure tensors).

The algorithm works on plain tensors, so it is testable without a model:

1. `assignment_maps`: product of the stages' soft assignment maps, A = A_1^T @ A_2^T ... -> [B, N_0, G].
2. `class_affinity`: group-to-class affinity with the main logit scale, masked to the top-k classes of the
   whole-image embedding: softmax(masked) * softmax(full) (the reference's "TODO: check if necessary" product).
3. `pixel_scores`: maps bilinearly upsampled to the crop, one group per pixel (argmax, "hard") or the soft mixture.
4. `with_background`: background where the best class score is under min(threshold, best affinity).

`Segmenter` adds what mmseg did around it: resize to a short side, whole image or sliding window (crops averaged),
bilinear resize of the logits to the original size, argmax.

Every image reaches the encoder through `inference_size` (`resize_short_side`), which bounds what one image may cost:
at most `MAX_LONG_SIDE` px on the long side and `MAX_PIXELS` px in all after resizing (larger ones are scaled down),
and an aspect ratio of at most `MAX_ASPECT_RATIO`:1 (more elongated images are refused with an `ImageSizeError`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from groupvit.evaluation.limits import MAX_ASPECT_RATIO, MAX_LONG_SIDE, MAX_PIXELS, ImageSizeError, inference_size  # noqa: F401

# A model's `segmentation_outputs(pixels) -> {"image", "groups", "soft_maps", "grid"}`.
Encoder = Callable[[torch.Tensor], Mapping[str, object]]


def assignment_maps(soft_maps: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Chain the stages' assignments from input tokens to final groups.

    Args:
        soft_maps: `A_i` of shape [B, G_i, G_{i-1}] (G_0 = N_0 patch tokens), softmax over the group axis (dim 1).

    Returns:
        [B, N_0, G_last], or None when there is no grouping stage (the pixel-wise baseline: each patch is a group).
    """
    if not soft_maps:
        return None
    out = soft_maps[0].transpose(1, 2)  # [B, N_0, G_1]
    for a in soft_maps[1:]:
        out = out @ a.transpose(1, 2)  # [B, N_0, G_i]
    return out


def stage_assignments(soft_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The cumulative assignment of every stage, [B, N_0, G_i] each (for pictures of the groups per stage)."""
    return [assignment_maps(soft_maps[: i + 1]) for i in range(len(soft_maps))]  # type: ignore[misc]


def class_affinity(groups: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: float,
                   top_k: int = 5) -> torch.Tensor:
    """Group-to-class affinity, filtered to the classes the whole image most likely shows.

    Args:
        groups: [B, G, D] L2-normalised group embeddings.
        image: [B, D] L2-normalised whole-image embedding.
        text: [C, D] L2-normalised class embeddings (background excluded).
        logit_scale: the model's main (clamped, exp) logit scale.
        top_k: keep the top min(top_k, C) classes of the image-level softmax; 0 keeps all.

    Returns:
        [B, G, C] affinities in [0, 1].
    """
    logits = logit_scale * groups @ text.t()  # [B, G, C]
    pre = logits.softmax(dim=-1)
    num_classes = text.shape[0]
    if top_k <= 0 or top_k >= num_classes:  # nothing masked: softmax(logits) * softmax(logits)
        return pre * pre
    image_probs = (logit_scale * image @ text.t()).softmax(dim=-1)  # [B, C]
    keep = torch.zeros_like(image_probs, dtype=torch.bool)
    keep.scatter_(1, image_probs.topk(top_k, dim=-1).indices, True)
    masked = logits.masked_fill(~keep[:, None, :], float("-inf"))
    return masked.softmax(dim=-1) * pre


def _grid_index(grid: tuple[int, int], size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """[H, W] index of the patch whose bilinear weight is largest at each pixel (the argmax of upsampled identity
    maps; `nearest-exact` uses the same half-pixel centres), without materialising N_0 maps."""
    h, w = grid
    ids = torch.arange(h * w, device=device, dtype=torch.float32).view(1, 1, h, w)
    return F.interpolate(ids, size=size, mode="nearest-exact")[0, 0].long()


def group_index(assignment: torch.Tensor | None, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """One group per pixel: argmax over the bilinearly upsampled assignment maps.

    Args:
        assignment: [B, N_0, G] from `assignment_maps`, or None (each patch is its own group).
        grid: (h, w) patch grid with h * w = N_0.
        size: (H, W) output size.

    Returns:
        [B, H, W] long group indices ([1, H, W] broadcastable when `assignment` is None).
    """
    if assignment is None:
        return _grid_index(grid, size, torch.device("cpu"))[None]
    b, n, g = assignment.shape
    maps = assignment.transpose(1, 2).reshape(b, g, *grid)  # [B, G, h, w]
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.argmax(dim=1)


def pixel_scores(assignment: torch.Tensor | None, affinity: torch.Tensor, grid: tuple[int, int],
                 size: tuple[int, int], hard: bool = True) -> torch.Tensor:
    """Class scores per pixel.

    Args:
        assignment: [B, N_0, G] or None (pixel-wise baseline: `affinity` is per patch, G = N_0).
        affinity: [B, G, C] from `class_affinity`.
        grid: (h, w) patch grid.
        size: (H, W) output size.
        hard: reference behaviour, each pixel takes its argmax group's affinities; False mixes the groups with the
            upsampled soft assignment (bilinear is linear, so this is upsample(A @ affinity)).

    Returns:
        [B, C, H, W].
    """
    b, g, c = affinity.shape
    if hard:
        idx = group_index(assignment, grid, size).to(affinity.device)  # [B|1, H, W]
        idx = idx.expand(b, *size).reshape(b, -1, 1).expand(-1, -1, c)  # [B, H*W, C]
        return affinity.gather(1, idx).transpose(1, 2).reshape(b, c, *size)
    token = affinity if assignment is None else assignment @ affinity  # [B, N_0, C]
    token = token.transpose(1, 2).reshape(b, c, *grid)
    return F.interpolate(token, size=size, mode="bilinear", align_corners=False)


def background_threshold(affinity: torch.Tensor, bg_thresh: float) -> torch.Tensor:
    """[B] per-image threshold min(bg_thresh, max affinity): the best group is never all background."""
    return affinity.flatten(1).max(dim=1).values.clamp(max=bg_thresh)


def with_background(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Prepend the background channel: 1 where the best class score is under the image's threshold, else 0.

    Args:
        scores: [B, C, H, W] foreground scores.
        threshold: [B] from `background_threshold`.

    Returns:
        [B, 1 + C, H, W] logits; class k + 1 is foreground class k.
    """
    bg = (scores.max(dim=1, keepdim=True).values < threshold.view(-1, 1, 1, 1)).to(scores.dtype)
    return torch.cat([bg, scores], dim=1)


def merge_background(logits: torch.Tensor, background_prompts: int) -> torch.Tensor:
    """Fold the last `background_prompts` channels of [B, 1 + C + E, H, W] into the background channel (max)."""
    if background_prompts == 0:
        return logits
    extra = logits[:, -background_prompts:].max(dim=1, keepdim=True).values
    return torch.cat([torch.maximum(logits[:, :1], extra), logits[:, 1:-background_prompts]], dim=1)


@dataclass(frozen=True)
class CropOutput:
    """What one forward yields before the background decision (so a threshold sweep reuses one forward)."""

    scores: torch.Tensor  # [B, C, H, W] foreground scores at crop size
    max_affinity: torch.Tensor  # [B] best group-class affinity of each crop
    groups: torch.Tensor | None  # [B, H, W] final group index per pixel (hard), None when not requested


def segment_crops(encode: Encoder, pixels: torch.Tensor, text: torch.Tensor, logit_scale: float, top_k: int = 5,
                  hard: bool = True, need_groups: bool = False) -> CropOutput:
    """Run the encoder on normalised crops [B, 3, H, W] and score every pixel for every class."""
    out = encode(pixels)
    size = tuple(pixels.shape[-2:])
    grid = tuple(out["grid"])  # type: ignore[arg-type]
    assignment = assignment_maps(out["soft_maps"])  # type: ignore[arg-type]
    affinity = class_affinity(out["groups"], out["image"], text, logit_scale, top_k)  # type: ignore[arg-type]
    scores = pixel_scores(assignment, affinity, grid, size, hard)  # type: ignore[arg-type]
    groups = None
    if need_groups:
        groups = group_index(assignment, grid, size).expand(pixels.shape[0], *size)  # type: ignore[arg-type]
    return CropOutput(scores, affinity.flatten(1).max(dim=1).values, groups)


def resize_short_side(pixels: torch.Tensor, short_side: int, long_side: int) -> torch.Tensor:
    """Keep-ratio resize of [B, 3, H, W] to `inference_size` (short side `short_side`, 0 = keep; long side at most
    `long_side`; within `MAX_LONG_SIDE` and `MAX_PIXELS`), bilinear.

    Raises:
        ImageSizeError: the image is more elongated than `MAX_ASPECT_RATIO`:1.
    """
    h, w = pixels.shape[-2:]
    size = inference_size(h, w, short_side, long_side)
    if size == (h, w):
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's sliding window: a grid of crops, the last one shifted back inside the image."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


@dataclass(frozen=True)
class SegmentationSettings:
    """How images reach the encoder (reference: slide, short side 448, crop 448, stride 224, top-5, hard)."""

    mode: str = "slide"  # "whole" | "slide"
    short_side: int = 448
    long_side: int = 2048
    crop: int = 448
    stride: int = 224
    top_k: int = 5
    hard: bool = True


class Segmenter:
    """Zero-shot segmentation of whole images with one model and one class list.

    Args:
        encode: the model's `segmentation_outputs`.
        text: [C + E, D] normalised class embeddings (background excluded), then E background prompts.
        logit_scale: the model's main logit scale (clamped exp).
        settings: resize, window and filtering settings.
        mean, std: per-channel normalisation of 0..1 RGB pixels.
        background_prompts: E, the number of trailing rows of `text` that name kinds of background (a departure
            from the reference, 0 there): they compete with the classes and their pixels become background.
    """

    def __init__(self, encode: Encoder, text: torch.Tensor, logit_scale: float, settings: SegmentationSettings,
                 mean: Sequence[float], std: Sequence[float], background_prompts: int = 0):
        self.encode, self.text, self.logit_scale, self.settings = encode, text, float(logit_scale), settings
        self.background_prompts = background_prompts
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> resized (`inference_size`: within `MAX_LONG_SIDE` / `MAX_PIXELS`), normalised float
        pixels.

        Raises:
            ImageSizeError: the images are more elongated than `MAX_ASPECT_RATIO`:1.
        """
        x = resize_short_side(images.float() / 255.0, self.settings.short_side, self.settings.long_side)
        return (x - self.mean) / self.std

    def _crops(self, pixels: torch.Tensor, need_groups: bool) -> CropOutput:
        s = self.settings
        return segment_crops(self.encode, pixels, self.text, self.logit_scale, s.top_k, s.hard, need_groups)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, thresholds: Sequence[float],
               need_groups: bool = False) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Background-aware logits at the original size for each threshold (one forward for all).

        Args:
            images: uint8 [B, 3, H, W] (same size within a batch).
            thresholds: background thresholds to apply.
            need_groups: also return the final group index per pixel (whole mode only).

        Returns:
            ([B, 1 + C, H, W] per threshold, [B, H, W] group index at the original size or None).
        """
        logits, groups = self._logits(images, thresholds, need_groups)
        return [merge_background(lg, self.background_prompts) for lg in logits], groups

    def _logits(self, images: torch.Tensor, thresholds: Sequence[float],
                need_groups: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        size = tuple(images.shape[-2:])
        pixels = self.prepare(images)
        if self.settings.mode == "whole":
            crop = self._crops(pixels, need_groups)
            outs = [with_background(crop.scores, crop.max_affinity.clamp(max=t)) for t in thresholds]
            groups = None
            if crop.groups is not None:
                groups = F.interpolate(crop.groups[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
            return [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs], groups
        outs = [self._slide(pixels[i:i + 1], thresholds) for i in range(pixels.shape[0])]
        per_thr = [torch.cat([o[j] for o in outs]) for j in range(len(thresholds))]
        return [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in per_thr], None

    def _slide(self, pixels: torch.Tensor, thresholds: Sequence[float]) -> list[torch.Tensor]:
        """mmseg `slide_inference` for one image [1, 3, H, W]: crops in one batch, logits averaged where they
        overlap."""
        s = self.settings
        h, w = pixels.shape[-2:]
        boxes = slide_windows(h, w, s.crop, s.stride)
        shapes = {(y2 - y1, x2 - x1) for y1, y2, x1, x2 in boxes}
        crops: list[CropOutput] = []
        if len(shapes) == 1:  # all crops have one size: one forward
            crops = [self._crops(torch.cat([pixels[..., y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]), False)]
        else:
            crops = [self._crops(pixels[..., y1:y2, x1:x2], False) for y1, y2, x1, x2 in boxes]
        scores = torch.cat([c.scores for c in crops]) if len(crops) == 1 else None
        results = []
        for t in thresholds:
            total = pixels.new_zeros(1, self.text.shape[0] + 1, h, w)
            count = pixels.new_zeros(1, 1, h, w)
            for i, (y1, y2, x1, x2) in enumerate(boxes):
                if scores is not None:
                    sc, mx = scores[i:i + 1], crops[0].max_affinity[i:i + 1]
                else:
                    sc, mx = crops[i].scores, crops[i].max_affinity
                total[..., y1:y2, x1:x2] += with_background(sc, mx.clamp(max=t))
                count[..., y1:y2, x1:x2] += 1
            results.append(total / count)
        return results

    def predict(self, images: torch.Tensor, bg_thresh: float) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, H, W] class indices (0 = background)."""
        return self.logits(images, [bg_thresh])[0][0].argmax(dim=1)


@torch.no_grad()
def stage_group_maps(segmenter: Segmenter, image: torch.Tensor) -> list[torch.Tensor]:
    """The group of every pixel after each grouping stage, for one uint8 image [3, H, W] (whole-image forward).

    Returns:
        one [H, W] long tensor per stage (empty for the pixel-wise baseline).
    """
    size = tuple(image.shape[-2:])
    pixels = segmenter.prepare(image[None])
    out = segmenter.encode(pixels)
    maps = []
    for a in stage_assignments(out["soft_maps"]):  # type: ignore[arg-type]
        idx = group_index(a, tuple(out["grid"]), tuple(pixels.shape[-2:]))  # type: ignore[arg-type]
        maps.append(F.interpolate(idx[:, None].float(), size=size, mode="nearest-exact")[0, 0].long())
    return maps
