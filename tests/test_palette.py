"""One VOC colour map for the synthetic masks and the evaluation pictures; the masks' bytes must never change (they are
in the synth stage's output hash)."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from groupvit.evaluation.palette import voc_palette
from groupvit.evaluation.visualize import colorize
from groupvit.synth.writer import encode_mask

# SHA-256 of the 768 palette bytes and of one encoded mask, as groupvit.synth.writer wrote them before the palette
# was shared (its own list-returning voc_palette): recorded, not recomputed, so any drift fails here.
PALETTE_SHA256 = "ec76f86cfddd0f4c0768796cda862d8f5099af416b298a406db7e84b55136fc9"
MASK_SHA256 = "4af747591d643356acecab7920c6ebc14b21b7eaef063c528c229f42f701326c"


def mask() -> np.ndarray:
    m = (np.arange(64 * 48).reshape(48, 64) % 23).astype(np.uint8)
    m[0, :] = 255  # the ignore value of the object borders
    return m


def test_palette_is_the_voc_colour_map_with_the_recorded_bytes():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert pal[:3].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert pal[15].tolist() == [192, 128, 128] and pal[255].tolist() == [224, 224, 192]
    assert hashlib.sha256(pal.tobytes()).hexdigest() == PALETTE_SHA256
    assert voc_palette(16).tolist() == pal[:16].tolist()


def test_synth_masks_keep_their_bytes_and_carry_the_shared_palette(tmp_path):
    data = encode_mask(mask())
    assert hashlib.sha256(data).hexdigest() == MASK_SHA256
    path = tmp_path / "m.png"
    path.write_bytes(data)
    with Image.open(path) as im:
        assert im.mode == "P" and bytes(im.getpalette()) == voc_palette().tobytes()
        assert np.array_equal(np.asarray(im), mask())


def test_pictures_colour_classes_with_the_same_map():
    labels = np.array([[0, 1], [15, 255]])
    out = colorize(labels, voc_palette())
    assert out[0, 1].tolist() == [128, 0, 0] and out[1, 0].tolist() == [192, 128, 128]
    assert out[1, 1].tolist() == [255, 255, 255]  # ignore is white in the pictures
