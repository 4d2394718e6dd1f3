"""Each data set layout reads from a tiny generated copy; bad input fails naming the file and what was wrong."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groupvit.errors import DataError
from groupvit.evaluation.classification import class_embeddings
from groupvit.evaluation.datasets import (
    DEFAULT_BG_THRESH,
    ImageFolderDataset,
    SegmentationDataset,
    SingleObjectDataset,
    load_class_names,
    resource_lines,
)


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, palette: bool = True, size=None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size or mask.shape
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(image_path)
    m = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        m = m.convert("P")
        m.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    m.save(mask_path)


def masks(num_classes: int) -> dict[str, np.ndarray]:
    a = np.zeros((6, 8), np.int64)
    a[1:4, 2:5] = num_classes - 1
    a[0, 0] = 255
    b = np.full((5, 7), 1)
    return {"2008_000001": a, "2008_000002": b}


def make_voc(root: Path, split="val", class_names=None) -> Path:
    for sid, m in masks(21).items():
        write_pair(root / "JPEGImages" / f"{sid}.jpg", root / "SegmentationClass" / f"{sid}.png", m)
    (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    (root / f"ImageSets/Segmentation/{split}.txt").write_text("2008_000001\n2008_000002\n")
    if class_names is not None:
        (root / "class_names.txt").write_text("\n".join(class_names) + "\n")
    return root


def test_voc_layout(tmp_path):
    ds = SegmentationDataset(make_voc(tmp_path / "VOC2012"), "voc", "val")
    assert ds.num_classes == 21 and ds.class_names[0] == "background" and ds.class_names[11] == "table"
    assert len(ds) == 2
    s = ds[0]
    assert s.id == "2008_000001" and s.image.shape == (3, 6, 8) and s.image.dtype == torch.uint8
    assert s.mask[2, 3] == 20 and s.mask[0, 0] == 255 and s.mask[5, 7] == 0  # palette indices, not colours
    assert [x.id for x in ds] == ["2008_000001", "2008_000002"]


def test_context_layout(tmp_path):
    root = tmp_path / "VOC2010"
    for sid, m in masks(60).items():
        write_pair(root / "JPEGImages" / f"{sid}.jpg", root / "SegmentationClassContext" / f"{sid}.png", m,
                   palette=False)
    (root / "ImageSets/SegmentationContext").mkdir(parents=True)
    (root / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n")
    ds = SegmentationDataset(root, "context", "val")
    assert ds.num_classes == 60 and ds.class_names[1] == "airplane" and len(ds) == 1
    assert int(ds[0].mask[0, 0]) == 1


def test_coco_object_layout(tmp_path):
    root = tmp_path / "coco"
    for sid, m in masks(81).items():
        write_pair(root / "images/val2017" / f"{sid}.jpg",
                   root / "annotations/val2017" / f"{sid}_instanceTrainIds.png", m, palette=False)
    ds = SegmentationDataset(root, "coco_object", "val2017")
    assert ds.num_classes == 81 and ds.class_names[1] == "person"
    assert ds.ids == ["2008_000001", "2008_000002"]  # every mask of the folder, sorted
    assert int(ds[0].mask[2, 3]) == 80


def test_synthetic_split_uses_own_class_names(tmp_path):
    names = ["background"] + [f"thing{i}" for i in range(20)]
    ds = SegmentationDataset(make_voc(tmp_path / "test", class_names=names), "voc", "val")
    assert ds.class_names == names


def test_single_object_view(tmp_path):
    ds = SingleObjectDataset(SegmentationDataset(make_voc(tmp_path / "v"), "voc"))
    # image 1 has one object class (20) on background, image 2 only class 1: both single-object
    assert [label for _, label in ds.items] == [19, 0] and len(ds.class_names) == 20


def test_image_folder(tmp_path):
    for cls in ("golden_retriever", "tabby"):
        d = tmp_path / "imgs" / cls
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(d / f"{i}.jpg")
    (tmp_path / "imgs" / "tabby" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path / "imgs")
    assert ds.class_names == ["golden retriever", "tabby"] and len(ds) == 4
    image, label = ds[3]
    assert image.shape == (3, 10, 12) and label == 1


def test_resources_ship_with_the_package():
    assert len(resource_lines("voc_classes_21.txt")) == 21
    assert len(resource_lines("pascal_context_classes_60.txt")) == 60
    assert len(resource_lines("coco_object_classes_81.txt")) == 81
    assert len(resource_lines("imagenet_templates_subset_7.txt")) == 7
    assert len(resource_lines("imagenet_templates_80.txt")) == 80
    assert DEFAULT_BG_THRESH == {"voc": 0.95, "context": 0.35, "coco_object": 0.95}


# --- bad input -------------------------------------------------------------------------------------------------

def test_mask_value_outside_class_range_names_file_and_value(tmp_path):
    root = make_voc(tmp_path / "v")
    bad = masks(21)["2008_000002"].copy()
    bad[2, 2] = 37
    write_pair(root / "JPEGImages/2008_000002.jpg", root / "SegmentationClass/2008_000002.png", bad)
    ds = SegmentationDataset(root, "voc")
    with pytest.raises(DataError, match=r"2008_000002\.png: mask value 37 outside the class range 0\.\.20"):
        ds[1]


def test_image_and_mask_sizes_differ(tmp_path):
    root = make_voc(tmp_path / "v")
    write_pair(root / "JPEGImages/2008_000001.jpg", root / "SegmentationClass/2008_000001.png",
               masks(21)["2008_000001"], size=(6, 9))
    with pytest.raises(DataError, match=r"2008_000001\.png: mask size \(8, 6\).*2008_000001\.jpg size \(9, 6\)"):
        SegmentationDataset(root, "voc")[0]


def test_rgb_mask_rejected(tmp_path):
    root = make_voc(tmp_path / "v")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "SegmentationClass/2008_000001.png")
    with pytest.raises(DataError, match="2008_000001.png: mask mode RGB"):
        SegmentationDataset(root, "voc")[0]


def test_missing_split_file_and_folder(tmp_path):
    root = make_voc(tmp_path / "v")
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/test\.txt: split file not found"):
        SegmentationDataset(root, "voc", "test")
    with pytest.raises(DataError, match="data set folder not found"):
        SegmentationDataset(tmp_path / "nope", "voc")
    with pytest.raises(DataError, match="layout 'ade'"):
        SegmentationDataset(root, "ade")
    (root / "JPEGImages/2008_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"2008_000002\.jpg: image not found"):
        SegmentationDataset(root, "voc")[1]


def test_empty_class_list_fails(tmp_path):
    root = make_voc(tmp_path / "v")
    (root / "class_names.txt").write_text("\n\n")
    with pytest.raises(DataError, match="class_names.txt: empty class list"):
        SegmentationDataset(root, "voc")
    with pytest.raises(DataError, match="class list is empty"):
        class_embeddings(lambda t: t, lambda texts: texts, [])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt: empty class list"):
        load_class_names(empty)


def test_zero_shot_classification_on_image_folder(tmp_path):
    from groupvit.evaluation.runner import evaluate_classification

    colours = {"red_thing": (255, 0, 0), "green_thing": (0, 255, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((30, 40, 3), rgb, np.uint8)).save(tmp_path / name / f"{i}.png")
    ds = ImageFolderDataset(tmp_path)
    text = torch.eye(3)[[2, 1, 0]]  # folders sorted: blue, green, red -> embeddings along B, G, R axes
    # a stand-in encoder: the mean colour of the (resized, centre-cropped, normalised) pixels
    acc = evaluate_classification(lambda x: x.mean(dim=(2, 3)), text, ds, resize=16, crop=12, mean=(0.5,) * 3,
                                  std=(0.5,) * 3, batch_size=4)
    assert acc == {"top1": 100.0, "top5": 100.0, "num_images": 6}
    wrong = evaluate_classification(lambda x: x.mean(dim=(2, 3)), torch.eye(3), ds, 16, 12, (0.5,) * 3, (0.5,) * 3)
    assert wrong["top1"] == 100 / 3  # only green lines up with the unpermuted axes
