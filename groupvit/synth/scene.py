"""Compose one scene: a textured background, several jittered objects with overlaps, and its exact label map.

Objects are painted in order; a later object overwrites an earlier one in the image and in the label map alike
(occlusion). A placement is accepted only if every object, the new one included, keeps at least `min_visible` of
its full area in view (occlusion and the frame together), so every object a caption may name is really visible.
Regions are drawn without antialiasing, so the label map is exact: every pixel labelled with a class lies inside an
object of that class. The ignore band of PASCAL VOC (255 on object borders) is added by `ignore_borders`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from groupvit.synth.backgrounds import BACKGROUNDS, draw_background
from groupvit.synth.categories import BY_NAME, CATEGORY_NAMES

IGNORE_INDEX = 255
MAX_TRIES = 25  # placements tried per object before it is dropped


@dataclass(frozen=True)
class WorldSpec:
    """What a scene looks like (the image half of the world's parameters).

    Attributes:
        image_size: side of the square image in pixels.
        categories: category names in class order (class index = position + 1; 0 is background).
        min_objects: fewest objects attempted per image.
        max_objects: most objects attempted per image.
        object_scale: (min, max) object diameter as a fraction of `image_size`.
        min_visible: the smallest fraction of an object's area that must stay in view.
    """
    image_size: int = 64
    categories: tuple[str, ...] = CATEGORY_NAMES
    min_objects: int = 2
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.35, 0.6)
    min_visible: float = 0.5


@dataclass
class PlacedObject:
    """One painted object. `region` is its drawn area inside `box` = (y0, y1, x0, x1), clipped to the image."""
    class_index: int
    cx: float
    cy: float
    radius: float
    area: int  # pixels of the whole shape, including any part outside the frame
    box: tuple[int, int, int, int]
    region: np.ndarray = field(repr=False)
    visible: int = 0  # pixels still in view in the finished scene


@dataclass
class Scene:
    """A finished scene: `image` uint8 [S, S, 3], `label` uint8 [S, S] (0 = background, no ignore band)."""
    image: np.ndarray
    label: np.ndarray
    objects: list[PlacedObject]
    background: int  # index into BACKGROUNDS

    def class_indices(self) -> list[int]:
        """Sorted distinct class indices of the objects in view."""
        return sorted({o.class_index for o in self.objects if o.visible > 0})


def _render(spec: WorldSpec, class_index: int, cx: float, cy: float, r: float, angle: float, mirror: bool,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int], int]:
    """Draw one object over its bounding square; return (region, rgb) clipped to the frame, the box and full area."""
    size = spec.image_size
    x0, x1 = math.floor(cx - r), math.ceil(cx + r)
    y0, y1 = math.floor(cy - r), math.ceil(cy + r)
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / r  # pixel centres, object frame, unit radius
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / r
    c, s = math.cos(angle), math.sin(angle)
    u = c * xs[None, :] + s * ys[:, None]  # [h, w]
    v = -s * xs[None, :] + c * ys[:, None]
    if mirror:
        u = -u
    region, rgb = BY_NAME[spec.categories[class_index - 1]].draw(u, v, rng)
    area = int(region.sum())
    # Clip the box to the frame.
    cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)
    crop = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    return region[crop], rgb[crop], (cy0, cy1, cx0, cx1), area


def _jitter(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-object shade jitter of [n, 3] pixels: brightness x0.85-1.15, +-12 per channel, fine sensor-like noise."""
    gain = np.float32(rng.uniform(0.85, 1.15))
    shift = rng.uniform(-12, 12, 3).astype(np.float32)
    return pixels * gain + shift + 3.0 * rng.standard_normal((len(pixels), 1), dtype=np.float32)


def make_scene(spec: WorldSpec, rng: np.random.Generator) -> Scene:
    """Generate one scene from `rng` (all randomness comes from it, so a seeded rng gives identical scenes)."""
    size = spec.image_size
    background = int(rng.integers(len(BACKGROUNDS)))
    canvas = draw_background(background, size, rng)  # float32 [S, S, 3]
    owner = np.zeros((size, size), np.int32)  # 0 = background, k + 1 = objects[k]
    objects: list[PlacedObject] = []
    visible: list[int] = []  # pixels in view per object, updated as later objects cover them
    lo, hi = spec.object_scale
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        class_index = int(rng.integers(len(spec.categories))) + 1
        category = BY_NAME[spec.categories[class_index - 1]]
        for _ in range(MAX_TRIES):
            r = 0.5 * size * rng.uniform(lo, hi)
            cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)
            angle = math.radians(rng.uniform(-category.max_rotation, category.max_rotation))
            region, rgb, box, area = _render(spec, class_index, cx, cy, r, angle, bool(rng.integers(2)), rng)
            y0, y1, x0, x1 = box
            covered = np.bincount(owner[y0:y1, x0:x1][region], minlength=len(objects) + 1)[1:]  # per object
            after = [vis - int(c) for vis, c in zip(visible, covered, strict=True)] + [int(region.sum())]
            full = [o.area for o in objects] + [area]
            if area > 0 and all(seen >= spec.min_visible * whole for seen, whole in zip(after, full, strict=True)):
                owner[y0:y1, x0:x1][region] = len(objects) + 1
                canvas[y0:y1, x0:x1][region] = _jitter(rgb[region], rng)
                objects.append(PlacedObject(class_index, float(cx), float(cy), float(r), area, box, region))
                visible = after
                break
    for obj, vis in zip(objects, visible, strict=True):
        obj.visible = vis
    lookup = np.array([0] + [o.class_index for o in objects], np.uint8)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Scene(image=image, label=lookup[owner], objects=objects, background=background)


def ignore_borders(label: np.ndarray, width: int = 1) -> np.ndarray:
    """PASCAL VOC-style mask: `label` with 255 on every pixel within `width` pixels of a different label.

    `width=1` marks the pixels on both sides of every boundary between two labels (object/background or
    object/object), where JPEG blur makes the true class ambiguous; `width=0` returns a copy of `label`.
    """
    out = label.copy()
    if width <= 0:
        return out
    edge = np.zeros(label.shape, bool)
    vertical = label[1:] != label[:-1]
    horizontal = label[:, 1:] != label[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    for _ in range(width - 1):  # grow the band by one pixel (4-neighbourhood) per step
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    out[edge] = IGNORE_INDEX
    return out
