"""Diagnostics that separate the two ways zero-shot segmentation fails.

- Text collapse: the mean pairwise cosine of the class-prompt embeddings. Near 1, every class prompt reads the same
  and no assignment of groups to classes can work.
- Grouping quality: the "group oracle" labels each final group with the true majority class of its pixels; its mIoU
  is what a perfect group-to-class step would reach with these groups (for the pixel-wise baseline, with patches).
"""
from __future__ import annotations

import torch

from groupvit.evaluation.datasets import IGNORE_INDEX


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of [C, D] (rows normalised here); NaN for fewer than two rows."""
    c = embeddings.shape[0]
    if c < 2:
        return float("nan")
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sim = e @ e.t()
    return float((sim.sum() - sim.diagonal().sum()) / (c * (c - 1)))


def oracle_labels(groups: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label each group with the majority ground-truth class of its pixels.

    Args:
        groups: [H, W] group index per pixel.
        target: [H, W] class indices, IGNORE_INDEX ignored.
        num_classes: number of classes including background.

    Returns:
        [H, W] prediction: every pixel takes its group's majority class (background for a group with only ignored
        pixels).
    """
    g = groups.flatten().long()
    t = target.flatten().long()
    valid = t != IGNORE_INDEX
    num_groups = int(g.max()) + 1
    votes = torch.zeros(num_groups * num_classes, dtype=torch.int64)
    votes.index_add_(0, g[valid] * num_classes + t[valid], torch.ones_like(t[valid]))
    majority = votes.view(num_groups, num_classes).argmax(dim=1)  # ties: lowest class index
    return majority[g].view_as(groups)
