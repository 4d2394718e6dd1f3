"""The object categories of the synthetic world: a characteristic shape, colour family and texture each.

A category is drawn in object-local coordinates `(u, v)`: the pixel centres of the object's bounding box, rotated
into the object's frame and divided by its radius, so every shape lies inside the unit disc whatever its size or
rotation. `draw(u, v, rng)` returns the object's region (boolean, no antialiasing, so the mask is exact) and the
colour of every pixel of the box before jitter; `scene.py` places, jitters and composes the objects.

Why consistent appearance: a first world with random colours per shape taught a tiny model nothing in 8 CPU minutes
(see the synthetic-world notes); real categories are recognisable from shape, colour family and texture together.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Array = np.ndarray
DrawFn = Callable[[Array, Array, np.random.Generator], tuple[Array, Array]]


@dataclass(frozen=True)
class Category:
    """One object category.

    Attributes:
        name: the class name (a plain noun; it is also the zero-shot prompt word and the canonical caption noun).
        plural: plural of `name`.
        synonyms: other (singular, plural) noun forms used in captions.
        max_rotation: the largest rotation in degrees (upright things such as a grape bunch tilt less).
        draw: `(u [h,w], v [h,w], rng) -> (region [h,w] bool, rgb [h,w,3] float32 in 0..255)`.
    """
    name: str
    plural: str
    synonyms: tuple[tuple[str, str], ...]
    max_rotation: float
    draw: DrawFn


def _rgb(shape: tuple[int, ...], colour: tuple[float, float, float]) -> Array:
    rgb = np.empty((*shape, 3), np.float32)
    rgb[...] = colour
    return rgb


def _light(u: Array, v: Array, strength: float = 0.22) -> Array:
    """A directional light from the top left: [h,w] brightness factors around 1, giving objects volume."""
    return (1.0 + strength * (-0.55 * u - 0.8 * v)).astype(np.float32)[..., None]


def _paint(rgb: Array, where: Array, colour: tuple[float, float, float]) -> None:
    rgb[where] = colour


def _tomato(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Slightly squat red sphere with a green star-shaped calyx on top and a specular highlight.
    region = u * u + (v * 1.12) ** 2 < 0.95
    rgb = _rgb(u.shape, (205, 38, 30)) * _light(u, v)
    theta = np.arctan2(v + 0.72, u)
    rr = np.hypot(u, v + 0.72)
    calyx = rr < 0.12 + 0.2 * np.abs(np.cos(2.5 * theta))
    _paint(rgb, calyx & region, (55, 130, 40))
    _paint(rgb, (u + 0.38) ** 2 + (v + 0.2) ** 2 < 0.018, (250, 170, 160))
    return region, rgb


def _lemon(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Yellow ellipse with pointed ends (nubs) and a dimpled peel.
    body = np.abs(v) < 0.66 * np.clip(1.0 - (u / 0.88) ** 2, 0.0, None) ** 0.6
    nubs = (np.abs(u) < 0.99) & (np.abs(v) < 0.09) & (np.abs(u) > 0.7)
    region = body | nubs
    rgb = _rgb(u.shape, (240, 214, 48)) * _light(u, v, 0.18)
    rgb *= (1.0 + 0.07 * rng.standard_normal(u.shape, dtype=np.float32))[..., None]  # pores
    return region, rgb


def _leaf(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Green almond with a pale midrib, slanted side veins and a short stalk.
    blade = (np.abs(v) < 0.55 * np.clip(1.0 - u * u, 0.0, None) * (1.0 + 0.25 * u)) & (u > -0.8)
    stalk = (u <= -0.75) & (u > -0.99) & (np.abs(v) < 0.05)
    region = blade | stalk
    rgb = _rgb(u.shape, (62, 150, 48)) * _light(u, v, 0.15)
    veins = (np.mod((u + 1.3 * np.abs(v)) * 4.0, 1.0) < 0.16) & blade
    _paint(rgb, veins, (45, 115, 35))
    _paint(rgb, (np.abs(v) < 0.04) & blade, (150, 200, 95))
    _paint(rgb, stalk, (105, 110, 45))
    return region, rgb


def _brick(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Orange-brown rough block with three dark holes.
    region = (np.abs(u) < 0.86) & (np.abs(v) < 0.48)
    rgb = _rgb(u.shape, (172, 82, 50)) * _light(u, v, 0.12)
    rgb *= (1.0 + 0.12 * rng.standard_normal(u.shape, dtype=np.float32))[..., None]  # rough clay
    holes = ((np.mod(u + 0.9, 0.6) - 0.3) ** 2 + v * v < 0.017) & (np.abs(u) < 0.75)
    _paint(rgb, holes, (70, 30, 20))
    return region, rgb


_PUFFS = ((-0.48, 0.12, 0.4), (-0.08, -0.18, 0.52), (0.42, 0.02, 0.46), (0.1, 0.22, 0.4))


def _cloud(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # White merged puffs with a flat, greyer underside.
    region = np.zeros(u.shape, bool)
    for cu, cv, r in _PUFFS:
        region |= (u - cu) ** 2 + (v - cv) ** 2 < r * r
    region &= v < 0.42
    shade = (1.0 - 0.28 * np.clip(v + 0.1, 0.0, None)).astype(np.float32)[..., None]
    return region, _rgb(u.shape, (246, 247, 250)) * shade


def _star(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Gold five-pointed star; the two faces of every point are lit differently (a bevel).
    theta = np.arctan2(u, -v)  # 0 = up
    sector = 2 * np.pi / 5
    a = np.mod(theta + sector / 2, sector) - sector / 2  # angle from the nearest point's axis
    edge = 0.46 + 0.52 * (1.0 - np.abs(a) / (sector / 2)) ** 1.5
    region = np.hypot(u, v) < edge
    rgb = _rgb(u.shape, (250, 172, 18))
    rgb *= np.where(a > 0, 1.08, 0.8).astype(np.float32)[..., None]
    return region, rgb


def _ball(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Blue sphere with a white band and a highlight.
    region = u * u + v * v < 0.95
    rgb = _rgb(u.shape, (35, 75, 205)) * _light(u, v, 0.3)
    _paint(rgb, np.abs(v + 0.15 * u * u) < 0.17, (240, 240, 240))
    _paint(rgb, (u + 0.4) ** 2 + (v + 0.45) ** 2 < 0.02, (190, 210, 255))
    return region, rgb


def _tire(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Dark rubber ring with tread notches around a silver rim; the hub hole shows the background.
    rr = np.hypot(u, v)
    notches = np.mod(np.arctan2(v, u) * (14 / (2 * np.pi)), 1.0) < 0.45
    region = (rr > 0.24) & ((rr < 0.9) | ((rr < 0.98) & ~notches))
    rgb = _rgb(u.shape, (38, 38, 42))
    _paint(rgb, (rr > 0.78) & (rr < 0.9) & notches, (70, 70, 75))
    _paint(rgb, rr < 0.48, (175, 178, 185))
    _paint(rgb, (rr < 0.48) & (rr > 0.42), (120, 122, 128))
    return region, rgb


def _fish(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # Teal-silver oval body with dark vertical stripes, an eye and a forked tail.
    body = ((u + 0.12) / 0.7) ** 2 + (v / 0.5) ** 2 < 1.0
    tail = (u > 0.5) & (u < 0.92) & (np.abs(v) < 0.08 + 0.7 * (u - 0.5)) & (np.abs(v) > 0.6 * (u - 0.6))
    region = body | tail
    rgb = _rgb(u.shape, (85, 160, 180)) * _light(u, v, 0.2)
    _paint(rgb, body & (np.mod(u * 3.2, 1.0) < 0.22) & (u > -0.45), (35, 80, 100))
    _paint(rgb, (u + 0.58) ** 2 + (v + 0.08) ** 2 < 0.008, (15, 15, 20))
    return region, rgb


_BERRIES = np.array([(u, v) for v, us in ((-0.52, (-0.5, -0.17, 0.17, 0.5)), (-0.15, (-0.33, 0.0, 0.33)),
                                          (0.22, (-0.17, 0.17)), (0.58, (0.0,))) for u in us], np.float32)


def _grape(u: Array, v: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    # A bunch of purple berries, each with its own highlight, hanging from a short brown stem.
    d2 = (u[..., None] - _BERRIES[:, 0]) ** 2 + (v[..., None] - _BERRIES[:, 1]) ** 2  # [h, w, berries]
    nearest = d2.argmin(-1)
    du = u - _BERRIES[nearest, 0]
    dv = v - _BERRIES[nearest, 1]
    berries = d2.min(-1) < 0.235 ** 2
    stem = (np.abs(u - 0.04 * (v + 0.7)) < 0.05) & (v < -0.6) & (v > -0.95)
    region = berries | stem
    rgb = _rgb(u.shape, (105, 42, 125)) * (1.0 + 0.9 * (-0.5 * du - 0.7 * dv)).astype(np.float32)[..., None]
    _paint(rgb, berries & ((du + 0.07) ** 2 + (dv + 0.07) ** 2 < 0.0025), (215, 180, 225))
    _paint(rgb, stem & ~berries, (110, 80, 40))
    return region, rgb


CATEGORIES: tuple[Category, ...] = (
    Category("tomato", "tomatoes", (("cherry tomato", "cherry tomatoes"), ("vine tomato", "vine tomatoes")),
             30, _tomato),
    Category("lemon", "lemons", (("citrus fruit", "citrus fruits"), ("citron", "citrons")), 180, _lemon),
    Category("leaf", "leaves", (("tree leaf", "tree leaves"), ("leaflet", "leaflets")), 180, _leaf),
    Category("brick", "bricks", (("clay brick", "clay bricks"), ("building block", "building blocks")), 180, _brick),
    Category("cloud", "clouds", (("cumulus cloud", "cumulus clouds"), ("puff", "puffs")), 12, _cloud),
    Category("star", "stars", (("star shape", "star shapes"), ("star sticker", "star stickers")), 180, _star),
    Category("ball", "balls", (("beach ball", "beach balls"), ("rubber ball", "rubber balls")), 180, _ball),
    Category("tire", "tires", (("tyre", "tyres"), ("wheel", "wheels")), 180, _tire),
    Category("fish", "fish", (("sardine", "sardines"), ("minnow", "minnows")), 35, _fish),
    Category("grape", "grapes", (("bunch of grapes", "bunches of grapes"), ("berry", "berries")), 25, _grape),
)
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
BY_NAME: dict[str, Category] = {c.name: c for c in CATEGORIES}
