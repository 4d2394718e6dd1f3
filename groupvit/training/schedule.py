"""Per-step learning rate: linear warm-up then cosine to the minimum (timm CosineLRScheduler, as the reference).

The reference uses timm's scheduler with `warmup_prefix=False`: the warm-up overrides the first steps and the cosine
runs over the whole planned length from step 0, so the first post-warm-up lr is slightly under the peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WarmupCosine:
    """lr(step) for a run of `total_steps` optimizer steps (all rates already scaled to the global batch)."""

    base_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + step * (self.base_lr - self.warmup_lr) / self.warmup_steps
        t = min(step, self.total_steps) / max(self.total_steps, 1)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's lr for the optimizer step number `step` (0-based); returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float | int]:
        """Plain numbers, so a checkpoint loads with `torch.load(weights_only=True)`."""
        return {"base_lr": self.base_lr, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}
