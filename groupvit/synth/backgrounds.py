"""Textured backgrounds of the synthetic world.

Backgrounds are muted (less saturated than the objects) but textured, so a model must separate objects from
texture rather than from a flat colour. They are never class names: the background class is predicted by a
threshold at evaluation, as for PASCAL VOC. Every background is equally likely with every object category, so a
background word in a caption says nothing about which objects the image holds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Array = np.ndarray


def _blocks(rng: np.random.Generator, size: int, cell_h: int, cell_w: int) -> Array:
    """Low-frequency noise [size, size]: a coarse normal grid repeated into cells (cheap, no interpolation)."""
    h, w = -(-size // cell_h), -(-size // cell_w)
    coarse = rng.standard_normal((h, w), dtype=np.float32)
    return np.repeat(np.repeat(coarse, cell_h, 0), cell_w, 1)[:size, :size]


def _fine(rng: np.random.Generator, size: int, sigma: float) -> Array:
    return sigma * rng.standard_normal((size, size, 1), dtype=np.float32)


def _base(size: int, colour: tuple[float, float, float]) -> Array:
    return np.broadcast_to(np.asarray(colour, np.float32), (size, size, 3)).copy()


def _grass(size: int, rng: np.random.Generator) -> Array:
    # Vertical blades: noise that varies fast across columns and slowly down them.
    blades = _blocks(rng, size, max(2, size // 8), 1)[..., None]
    return _base(size, (98, 128, 70)) * (1.0 + 0.14 * blades) + _fine(rng, size, 5)


def _sand(size: int, rng: np.random.Generator) -> Array:
    ripples = np.sin(np.arange(size, dtype=np.float32)[:, None] * rng.uniform(0.3, 0.6) + _blocks(rng, size, 4, 4))
    return _base(size, (204, 186, 148)) * (1.0 + 0.04 * ripples[..., None]) + _fine(rng, size, 9)


def _sky(size: int, rng: np.random.Generator) -> Array:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = np.array((112, 152, 205), np.float32), np.array((188, 208, 232), np.float32)
    return top + t * (bottom - top) + _fine(rng, size, 2)


def _wood(size: int, rng: np.random.Generator) -> Array:
    # Horizontal planks with wavy grain and dark seams.
    y = np.arange(size, dtype=np.float32)[:, None]
    grain = np.sin(y * rng.uniform(0.8, 1.4) + 2.0 * _blocks(rng, size, 2, max(2, size // 6)))
    img = _base(size, (176, 138, 98)) * (1.0 + 0.07 * grain[..., None]) + _fine(rng, size, 3)
    plank = max(6, size // int(rng.integers(3, 6)))
    img[int(rng.integers(0, plank))::plank] *= 0.6
    return img


def _water(size: int, rng: np.random.Generator) -> Array:
    y = np.arange(size, dtype=np.float32)[:, None]
    x = np.arange(size, dtype=np.float32)[None, :]
    waves = np.sin(0.9 * y + 0.8 * np.sin(x * 0.25 + rng.uniform(0, 6.3)))
    return _base(size, (62, 108, 130)) * (1.0 + 0.12 * waves[..., None]) + _fine(rng, size, 3)


def _concrete(size: int, rng: np.random.Generator) -> Array:
    blotches = _blocks(rng, size, max(2, size // 8), max(2, size // 8))[..., None]
    return _base(size, (138, 137, 132)) * (1.0 + 0.06 * blotches) + _fine(rng, size, 10)


def _fabric(size: int, rng: np.random.Generator) -> Array:
    # A muted gingham: two pastel tones in checks.
    cell = max(3, size // int(rng.integers(4, 9)))
    idx = np.arange(size)
    checks = (((idx[:, None] // cell) + (idx[None, :] // cell)) % 2).astype(np.float32)[..., None]
    a = rng.uniform(150, 215, 3).astype(np.float32)
    b = 0.5 * a + 0.5 * a.mean()  # same tone, less saturated
    return a + checks * (b - a) + _fine(rng, size, 3)


def _plain(size: int, rng: np.random.Generator) -> Array:
    grey = rng.uniform(90, 200)  # never near-white: clouds must stand out
    tint = rng.uniform(-18, 18, 3)
    return _base(size, tuple(grey + tint)) + _fine(rng, size, 2)


@dataclass(frozen=True)
class Background:
    """A background texture and the caption phrases that may describe it."""
    name: str
    phrases: tuple[str, ...]
    draw: Callable[[int, np.random.Generator], Array]


BACKGROUNDS: tuple[Background, ...] = (
    Background("grass", ("on the grass", "in the grass", "on a lawn"), _grass),
    Background("sand", ("on the sand", "at the beach", "on sand"), _sand),
    Background("sky", ("against the sky", "under the open sky"), _sky),
    Background("wood", ("on a wooden table", "on wood", "on the floorboards"), _wood),
    Background("water", ("in the water", "by the water"), _water),
    Background("concrete", ("on concrete", "on the pavement", "on the ground"), _concrete),
    Background("fabric", ("on a tablecloth", "on a blanket"), _fabric),
    Background("plain", ("on a plain background", "isolated", "in the studio"), _plain),
)


def draw_background(index: int, size: int, rng: np.random.Generator) -> Array:
    """Background `index` as float32 [size, size, 3] (0..255 before clipping), brightness-jittered."""
    return BACKGROUNDS[index].draw(size, rng) * np.float32(rng.uniform(0.88, 1.12))
