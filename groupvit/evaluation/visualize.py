"""Pictures of zero-shot segmentation: image, prediction with a class legend, ground truth, groups of each stage."""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from groupvit.atomic import atomic_write  # noqa: E402
from groupvit.evaluation.datasets import IGNORE_INDEX, SegmentationDataset  # noqa: E402
from groupvit.evaluation.palette import voc_palette  # noqa: E402
from groupvit.evaluation.segmentation import Segmenter, stage_group_maps  # noqa: E402


def group_palette(n: int, seed: int = 0) -> np.ndarray:
    """[n, 3] distinct-looking random colours for group indices."""
    return np.random.default_rng(seed).integers(40, 256, size=(n, 3), dtype=np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H, W] indices -> [H, W, 3] uint8; IGNORE_INDEX is white."""
    out = palette[np.clip(labels, 0, len(palette) - 1)]
    out[labels == IGNORE_INDEX] = 255
    return out


def blend(image: np.ndarray, colours: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    return (image * (1 - opacity) + colours * opacity).astype(np.uint8)


def _legend(ax: plt.Axes, labels: np.ndarray, class_names: Sequence[str], palette: np.ndarray) -> None:
    present = [int(c) for c in np.unique(labels) if c != IGNORE_INDEX and c < len(class_names)]
    handles = [Patch(color=palette[c] / 255.0, label=class_names[c]) for c in present]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7, ncol=2,
                  frameon=False)


def prediction_overlay(image: torch.Tensor, pred: torch.Tensor, opacity: float = 0.5) -> np.ndarray:
    """The prediction over the image in the PASCAL VOC colours, as the "prediction" panel of `segmentation_figure`.

    Args:
        image: uint8 [3, H, W].
        pred: [H, W] class indices (0 = background, black).
        opacity: weight of the class colours.

    Returns:
        uint8 [H, W, 3].
    """
    return blend(image.permute(1, 2, 0).numpy(), colorize(pred.numpy(), voc_palette()), opacity)


def class_legend(pred: torch.Tensor, class_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, RGB colour of `prediction_overlay`) of every class present in `pred`, in class order.

    Args:
        pred: [H, W] class indices.
        class_names: names including background.
    """
    pal = voc_palette()
    present = [int(c) for c in torch.unique(pred).tolist() if c != IGNORE_INDEX and c < len(class_names)]
    return [(class_names[c], (int(pal[c][0]), int(pal[c][1]), int(pal[c][2]))) for c in present]


def group_overlays(image: torch.Tensor, stage_groups: Sequence[torch.Tensor]) -> list[tuple[np.ndarray, str]]:
    """The groups of each grouping stage over the image, as the "stage i groups" panels of `segmentation_figure`.

    Args:
        image: uint8 [3, H, W].
        stage_groups: [H, W] group index per stage (`groupvit.evaluation.segmentation.stage_group_maps`).

    Returns:
        (uint8 [H, W, 3], caption) per stage; the caption counts the groups that own at least one pixel.
    """
    img = image.permute(1, 2, 0).numpy()
    out = []
    for i, g in enumerate(stage_groups):
        gn = g.numpy()
        out.append((blend(img, colorize(gn, group_palette(int(gn.max()) + 1, seed=i))),
                    f"stage {i + 1} groups ({len(np.unique(gn))} used)"))
    return out


def segmentation_figure(image: torch.Tensor, pred: torch.Tensor, class_names: Sequence[str],
                        target: torch.Tensor | None = None, stage_groups: Sequence[torch.Tensor] = (),
                        title: str = "") -> bytes:
    """A PNG: the image, the prediction overlaid with a legend of predicted classes, the ground truth (when given)
    and the groups of each stage overlaid on the image.

    Args:
        image: uint8 [3, H, W].
        pred: [H, W] class indices (0 = background).
        class_names: names including background.
        target: [H, W] ground truth or None.
        stage_groups: [H, W] group index per stage.
        title: figure title.
    """
    img = image.permute(1, 2, 0).numpy()
    pal = voc_palette()
    panels: list[tuple[str, np.ndarray, np.ndarray | None]] = [("image", img, None)]
    p = pred.numpy()
    panels.append(("prediction", prediction_overlay(image, pred), p))
    if target is not None:
        t = target.numpy()
        panels.append(("ground truth", blend(img, colorize(t, pal)), t))
    panels += [(caption, picture, None) for picture, caption in group_overlays(image, stage_groups)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.4), squeeze=False)
    for ax, (name, picture, labels) in zip(axes[0], panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        if labels is not None:
            _legend(ax, labels, class_names, pal)
    if title:
        fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def prediction_figure(segmenter: Segmenter, image: torch.Tensor, pred: torch.Tensor, class_names: Sequence[str],
                      target: torch.Tensor | None = None, title: str = "") -> bytes:
    """`segmentation_figure` of a segmenter's prediction, with the groups of each of its stages on `image`.

    Args:
        segmenter: what predicted `pred` (its model gives the groups).
        image: uint8 [3, H, W].
        pred: [H, W] class indices (0 = background).
        class_names: names including background.
        target: [H, W] ground truth or None.
        title: figure title.
    """
    groups = stage_group_maps(segmenter, image)
    return segmentation_figure(image, pred, class_names, target, groups, title=title)


def write_pictures(folder: str | os.PathLike[str], dataset: SegmentationDataset, segmenters: Mapping[str, Segmenter],
                   data_set: str, thresholds: Mapping[str, float], count: int) -> list[Path]:
    """Pictures of the first `count` images of a data set, one per model, each written atomically.

    Args:
        folder: where the PNGs go, as `<data set>_<index>_<image id>_<model>.png`.
        dataset: the images and their ground truth.
        segmenters: each model's segmenter for the data set, by model name.
        data_set: the data set's name (file names, titles).
        thresholds: each model's background threshold.
        count: number of images.
    """
    paths = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        for name, seg in segmenters.items():
            pred = seg.predict(sample.image[None], thresholds[name])[0]
            png = prediction_figure(seg, sample.image, pred, dataset.class_names, sample.mask,
                                    title=f"{data_set} {sample.id} - {name}")
            paths.append(atomic_write(Path(folder) / f"{data_set}_{i:03d}_{sample.id}_{name}.png", png))
    return paths
