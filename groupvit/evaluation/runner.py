"""Dataset loops: zero-shot segmentation into confusion matrices, zero-shot classification into accuracies."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from groupvit.evaluation.classification import ClassificationAccuracy
from groupvit.evaluation.datasets import Sample, SegmentationDataset
from groupvit.evaluation.diagnostics import oracle_labels
from groupvit.evaluation.limits import MAX_LONG_SIDE, inference_size
from groupvit.evaluation.metrics import ConfusionMatrix, SegmentationScores
from groupvit.evaluation.segmentation import Segmenter, resize_short_side


def batches(dataset: SegmentationDataset, batch_size: int, limit: int = 0) -> Iterator[list[Sample]]:
    """Consecutive samples in batches of at most `batch_size` images of one size (so they stack)."""
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    batch: list[Sample] = []
    for i in range(n):
        s = dataset[i]
        if batch and (len(batch) == batch_size or s.image.shape != batch[0].image.shape):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


@dataclass
class SegmentationRun:
    """Scores for each background threshold, the group oracle, and the speed of the loop."""

    thresholds: list[float]
    scores: dict[float, SegmentationScores]
    oracle: SegmentationScores | None
    num_images: int
    seconds: float
    matrices: dict[float, ConfusionMatrix] = field(repr=False, default_factory=dict)
    groups_per_image: float | None = None  # distinct groups owning at least one pixel, mean over images (collapse)

    def best_threshold(self) -> float:
        """The threshold with the highest mIoU (first one on ties)."""
        return max(self.thresholds, key=lambda t: (self.scores[t].miou, -self.thresholds.index(t)))


def evaluate_segmentation(segmenter: Segmenter, dataset: SegmentationDataset, thresholds: Sequence[float],
                          batch_size: int = 16, limit: int = 0, oracle: bool = True,
                          progress: Callable[[int], None] | None = None) -> SegmentationRun:
    """Segment every image of `dataset` and accumulate one confusion matrix per background threshold.

    Args:
        segmenter: model, class embeddings and settings.
        dataset: images and masks; `dataset.class_names[0]` is background.
        thresholds: background thresholds evaluated from the same forward passes.
        batch_size: images per forward in whole mode (images of one size only).
        limit: evaluate only the first `limit` images (0 = all).
        oracle: also score the group oracle (whole mode only; sliding windows have no image-wide groups).
        progress: called with the number of images done after each batch.
    """
    thresholds = list(thresholds)
    n = dataset.num_classes
    matrices = {t: ConfusionMatrix(n) for t in thresholds}
    oracle_cm = ConfusionMatrix(n) if oracle and segmenter.settings.mode == "whole" else None
    done, start, groups_used, grouped = 0, time.perf_counter(), 0, 0
    settings = segmenter.settings
    for batch in batches(dataset, batch_size if segmenter.settings.mode == "whole" else 1, limit):
        images = torch.stack([s.image for s in batch])
        # the size limits, checked here to name the image (a batch shares one size)
        inference_size(*images.shape[-2:], settings.short_side, settings.long_side, _where(dataset, batch[0].id))
        targets = torch.stack([s.mask for s in batch])
        logits, groups = segmenter.logits(images, thresholds, need_groups=oracle_cm is not None)
        for t, lg in zip(thresholds, logits, strict=True):
            matrices[t].update(lg.argmax(dim=1), targets)
        if oracle_cm is not None and groups is not None:
            # one vote count for the batch: offset the group ids so that every image's groups stay its own
            offsets = torch.arange(len(batch)).view(-1, 1, 1) * (int(groups.max()) + 1)
            oracle_cm.update(oracle_labels(groups + offsets, targets, n), targets)
            groups_used, grouped = groups_used + sum(len(g.unique()) for g in groups), grouped + len(groups)
        done += len(batch)
        if progress is not None:
            progress(done)
    seconds = time.perf_counter() - start
    names = dataset.class_names
    return SegmentationRun(thresholds, {t: m.result(names) for t, m in matrices.items()},
                           oracle_cm.result(names) if oracle_cm is not None else None, done, seconds, matrices,
                           groups_used / grouped if grouped else None)


def _where(dataset, item: object) -> str:
    """`<data set root>: image <id>` for messages."""
    return f"{getattr(dataset, 'root', 'data set')}: image {item}"


def classification_pixels(images: torch.Tensor, resize: int, crop: int, mean: Sequence[float],
                          std: Sequence[float]) -> torch.Tensor:
    """Reference classification preprocessing: resize the short side to `resize`, centre crop `crop`, normalise.

    The resize keeps the shared limits of `inference_size` (long side at most `MAX_LONG_SIDE`, `MAX_PIXELS` in all).

    Args:
        images: uint8 [B, 3, H, W].

    Raises:
        ImageSizeError: the images are more elongated than `MAX_ASPECT_RATIO`:1.
    """
    x = resize_short_side(images.float() / 255.0, resize, MAX_LONG_SIDE)
    h, w = x.shape[-2:]
    if crop > 0:
        top, left = max((h - crop) // 2, 0), max((w - crop) // 2, 0)
        x = x[..., top:top + crop, left:left + crop]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def evaluate_classification(encode_image: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor, dataset,
                            resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                            batch_size: int = 64, limit: int = 0) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy over a dataset of `(uint8 image [3, H, W], label)` items."""
    acc = ClassificationAccuracy(text)
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, n))]
        for i, (img, _) in enumerate(items, start):  # the size limits, checked here to name the image
            inference_size(*img.shape[-2:], resize, MAX_LONG_SIDE, _where(dataset, i))
        pixels = [classification_pixels(img[None], resize, crop, mean, std) for img, _ in items]
        if len({p.shape for p in pixels}) == 1:  # one forward when the images share a size
            emb = encode_image(torch.cat(pixels))
        else:
            emb = torch.cat([encode_image(p) for p in pixels])
        acc.update(F.normalize(emb.float(), dim=-1), torch.tensor([label for _, label in items]))
    return acc.result()
