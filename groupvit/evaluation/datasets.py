"""Evaluation data sets: PASCAL VOC layout (also the synthetic splits), PASCAL Context, COCO-Object, image folders.

Layouts (as the reference's mmseg configs read them; class lists with the reference's renames ship as package data):

- `voc`: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png`, split `ImageSets/Segmentation/<split>.txt`.
- `context`: `JPEGImages/<id>.jpg`, `SegmentationClassContext/<id>.png`,
  split `ImageSets/SegmentationContext/<split>.txt`.
- `coco_object`: `images/<split>/<id>.jpg`, `annotations/<split>/<id>_instanceTrainIds.png`, every mask of the folder.

Masks are palette or greyscale PNGs of class indices (0 = background); 255 is ignored. A `class_names.txt` in the
data set root (background first) overrides the layout's class list (the synthetic world ships one).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groupvit.errors import DataError

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class Layout:
    images: str
    masks: str
    mask_suffix: str
    split_file: str | None  # relative path with {split}; None = every mask in the folder
    classes: str  # package resource with the default class list


LAYOUTS = {
    "voc": Layout("JPEGImages", "SegmentationClass", ".png", "ImageSets/Segmentation/{split}.txt",
                  "voc_classes_21.txt"),
    "context": Layout("JPEGImages", "SegmentationClassContext", ".png", "ImageSets/SegmentationContext/{split}.txt",
                      "pascal_context_classes_60.txt"),
    "coco_object": Layout("images/{split}", "annotations/{split}", "_instanceTrainIds.png", None,
                          "coco_object_classes_81.txt"),
}

# The reference's background thresholds (code values, not the paper's 0.9 / 0.5; NVlabs/GroupViT#56).
DEFAULT_BG_THRESH = {"voc": 0.95, "context": 0.35, "coco_object": 0.95}


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def resource_lines(name: str) -> list[str]:
    """A list shipped in `groupvit/resources/` (class lists, prompt templates)."""
    return [line.strip() for line in (resources.files("groupvit") / "resources" / name).read_text().splitlines()
            if line.strip()]


def load_class_names(source: str | Path) -> list[str]:
    """Class names from a package resource name (e.g. `voc_classes_21.txt`) or a file path; fails when empty."""
    path = Path(source)
    names = read_lines(path) if path.is_file() else resource_lines(str(source))
    if not names:
        raise DataError(f"{source}: empty class list (expected one class name per line)")
    return names


def read_image(path: Path) -> torch.Tensor:
    """RGB uint8 [3, H, W]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (OSError, Image.DecompressionBombError) as e:  # the latter: over PIL's pixel limit (~179 M px)
        raise DataError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_mask(path: Path, num_classes: int) -> torch.Tensor:
    """Class-index mask [H, W] (int64); every value must be a class index or 255 (ignore)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"{path}: mask mode {im.mode}, expected a palette or greyscale PNG of class indices")
            arr = np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DataError(f"{path}: mask not found") from None
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: not a readable mask ({e})") from None
    bad = np.unique(arr[(arr >= num_classes) & (arr != IGNORE_INDEX) | (arr < 0)])
    if bad.size:
        raise DataError(f"{path}: mask value {int(bad[0])} outside the class range 0..{num_classes - 1} "
                        f"(and {IGNORE_INDEX} = ignore)")
    return torch.from_numpy(arr)


@dataclass(frozen=True)
class Sample:
    id: str
    image: torch.Tensor  # uint8 [3, H, W]
    mask: torch.Tensor  # int64 [H, W]


class SegmentationDataset:
    """Images and class-index masks of one split in one of `LAYOUTS`.

    Args:
        root: data set root (e.g. `VOCdevkit/VOC2012`, `data/synth/test`).
        layout: `voc`, `context` or `coco_object`.
        split: split name (`val`; `val2017` for COCO-Object).
        classes: class list file or resource; default `<root>/class_names.txt` if present, else the layout's list.
    """

    def __init__(self, root: str | Path, layout: str = "voc", split: str = "val", classes: str | None = None):
        if layout not in LAYOUTS:
            raise DataError(f"dataset layout {layout!r}: expected one of {sorted(LAYOUTS)}")
        self.root, self.layout, self.split = Path(root), LAYOUTS[layout], split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data set folder not found")
        own = self.root / "class_names.txt"
        self.class_names = load_class_names(classes or (own if own.is_file() else self.layout.classes))
        self.image_dir = self.root / self.layout.images.format(split=split)
        self.mask_dir = self.root / self.layout.masks.format(split=split)
        self.ids = self._ids()

    def _ids(self) -> list[str]:
        lay = self.layout
        if lay.split_file is not None:
            split_path = self.root / lay.split_file.format(split=self.split)
            if not split_path.is_file():
                raise DataError(f"{split_path}: split file not found (expected one image id per line)")
            ids = read_lines(split_path)
            if not ids:
                raise DataError(f"{split_path}: split file lists no image ids")
            return ids
        if not self.mask_dir.is_dir():
            raise DataError(f"{self.mask_dir}: mask folder not found")
        ids = sorted(p.name[: -len(lay.mask_suffix)] for p in self.mask_dir.glob(f"*{lay.mask_suffix}"))
        if not ids:
            raise DataError(f"{self.mask_dir}: no masks matching *{lay.mask_suffix}")
        return ids

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Sample:
        sid = self.ids[i]
        image = read_image(self.image_dir / f"{sid}.jpg")
        mask_path = self.mask_dir / f"{sid}{self.layout.mask_suffix}"
        mask = read_mask(mask_path, self.num_classes)
        if tuple(mask.shape) != tuple(image.shape[1:]):
            raise DataError(f"{mask_path}: mask size {tuple(mask.shape[::-1])} (w, h) differs from its image "
                            f"{self.image_dir / (sid + '.jpg')} size {tuple(image.shape[1:][::-1])}")
        return Sample(sid, image, mask)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))


class ImageFolderDataset:
    """Classification images in `root/<class name>/<image>`; folder names are the class names (`_` -> space)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: image folder not found")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DataError(f"{self.root}: no class folders (expected root/<class name>/<image>)")
        self.class_names = [p.name.replace("_", " ") for p in folders]
        self.items = [(f, label) for label, d in enumerate(folders)
                      for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise DataError(f"{self.root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return read_image(path), label


class SingleObjectDataset:
    """Classification view of a segmentation data set: images whose mask shows exactly one foreground class.

    Labels index the foreground classes (`class_names` excludes background), as zero-shot classification scores
    only named classes.
    """

    def __init__(self, seg: SegmentationDataset):
        self.seg = seg
        self.class_names = seg.class_names[1:]
        self.items: list[tuple[int, int]] = []
        for i in range(len(seg)):
            mask = read_mask(seg.mask_dir / f"{seg.ids[i]}{seg.layout.mask_suffix}", seg.num_classes)
            present = [c for c in mask.unique().tolist() if c not in (0, IGNORE_INDEX)]
            if len(present) == 1:
                self.items.append((i, present[0] - 1))
        if not self.items:
            raise DataError(f"{seg.root}: no image with exactly one foreground class")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        idx, label = self.items[i]
        return self.seg[idx].image, label
