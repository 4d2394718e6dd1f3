"""Segmentation metrics from a confusion matrix accumulated over a whole dataset (mmseg's definition).

IoU_c = TP_c / (TP_c + FP_c + FN_c) over all pixels of the dataset; mIoU is the mean over classes that occur in the
ground truth or the prediction (a class absent from both has no IoU, like mmseg's NaN-mean). Background is a class.
Pixels labelled `ignore_index` (255: object borders in VOC) are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ConfusionMatrix:
    """Accumulates `[num_classes, num_classes]` counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one or more predictions [..., H, W] against targets of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        t, p = target[valid].long(), pred[valid].long()
        n = self.num_classes
        self.counts += torch.bincount(t * n + p, minlength=n * n).view(n, n)

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts

    def result(self, class_names: list[str] | None = None) -> SegmentationScores:
        return SegmentationScores.from_counts(self.counts, class_names)


@dataclass(frozen=True)
class SegmentationScores:
    """mIoU, per-class IoU (NaN for a class absent from ground truth and prediction) and pixel accuracy."""

    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    iou: dict[str, float]

    @staticmethod
    def from_counts(counts: torch.Tensor, class_names: list[str] | None = None) -> SegmentationScores:
        counts = counts.double()
        tp = counts.diag()
        gt = counts.sum(dim=1)
        pred = counts.sum(dim=0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        names = class_names or [str(i) for i in range(len(tp))]
        total = counts.sum()
        return SegmentationScores(
            miou=float(iou.nanmean()) if union.gt(0).any() else math.nan,
            pixel_accuracy=float(tp.sum() / total) if total > 0 else math.nan,
            mean_accuracy=float(acc.nanmean()) if gt.gt(0).any() else math.nan,
            iou={n: float(v) for n, v in zip(names, iou, strict=True)},
        )

    def as_dict(self, percent: bool = True) -> dict[str, float]:
        """Headline figures, in percent by default (as papers and mmseg report them)."""
        k = 100.0 if percent else 1.0
        return {"miou": round(self.miou * k, 4), "pixel_accuracy": round(self.pixel_accuracy * k, 4),
                "mean_accuracy": round(self.mean_accuracy * k, 4)}


def all_background_miou(counts: torch.Tensor) -> float:
    """mIoU of predicting background everywhere: the floor a model has to beat on a data set.

    From the ground-truth totals of a confusion matrix (rows = ground truth, class 0 = background) alone: background
    scores TP / (TP + FP) = (its pixels) / (all pixels), and every other class present in the ground truth scores 0.

    Args:
        counts: [C, C] confusion counts of any prediction on the data set.
    """
    gt = counts.sum(dim=1).double()  # [C] pixels of each class in the ground truth
    ious = [gt[0] / gt.sum()] + [0.0 for c in range(1, len(gt)) if gt[c] > 0]
    return float(sum(ious) / len(ious))
