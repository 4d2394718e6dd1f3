"""What a training run did (`fit`'s `TrainResult`) and its two summaries: `metrics/train.json` and the loss curve.

    result = fit(...)
    result.summary(cfg, steps_per_epoch, world_size)   # {"final_loss", "steps", "planned_steps", "planned_by", ...}
    result.curve_csv()                                 # step,loss,loss_itc,loss_ml,lr (one row per log step)
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from groupvit.training.config import TrainConfig

CURVE_FIELDS = ("step", "loss", "loss_itc", "loss_ml", "lr")


@dataclass
class TrainResult:
    """What a run did (rank 0's view; metrics are averaged over ranks)."""

    step: int
    planned_steps: int
    final_loss: float
    images_per_s: float
    wall_s: float
    stopped_by_budget: bool
    resumed_from: int | None
    curve: list[dict[str, float]] = field(default_factory=list)

    def full_steps(self, cfg: TrainConfig, steps_per_epoch: int) -> int:
        """The length `cfg` asks for (`train.steps`, else `train.epochs` of `steps_per_epoch`), before any budget."""
        return cfg.steps or math.ceil(cfg.epochs * steps_per_epoch)

    def summary(self, cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> dict[str, Any]:
        """The run's figures for `metrics/train.json`; `planned_by` says whether the length or the wall-clock budget
        (`train.max_minutes`, the only way the machine's speed decides the length) set the planned steps."""
        planned_by = "time budget" if self.planned_steps < self.full_steps(cfg, steps_per_epoch) else "length"
        return {"final_loss": self.final_loss, "steps": self.step, "planned_steps": self.planned_steps,
                "planned_by": planned_by, "max_minutes": cfg.max_minutes,
                "images_per_s": round(self.images_per_s, 3), "wall_s": round(self.wall_s, 1),
                "stopped_by_budget": self.stopped_by_budget, "world_size": world_size,
                "global_batch": cfg.batch_size * world_size * cfg.grad_accum}

    def curve_csv(self) -> str:
        """The loss curve as CSV (`CURVE_FIELDS`; values to 6 significant digits), one row per log step."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in self.curve:
            writer.writerow({k: r[k] if k == "step" else f"{r[k]:.6g}" for k in CURVE_FIELDS})
        return buf.getvalue()
