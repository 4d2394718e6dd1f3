"""When a training resumes: the configuration a checkpoint must match, and why an existing checkpoint is not resumed.

Every checkpoint stores `resume_key(configs)`, the resolved configuration minus the keys that may change between a
run and its resumption (bookkeeping, speed, where to log). `fit` resumes the latest checkpoint only when that key is
unchanged and the run it belongs to has not finished; otherwise it starts afresh (old checkpoints moved aside).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from groupvit.config import flat_dict, to_dict
from groupvit.training import checkpointing as ckpt
from groupvit.training.config import TrainConfig

# Flat keys (or prefixes ending in '.') that may change between a run and its resumption; any other change in the
# resolved config makes `fit` start afresh instead of resuming an incompatible checkpoint.
RESUMABLE_CHANGES = ("train.log_every", "train.ckpt_every", "train.keep_checkpoints", "train.resume", "train.threads",
                     "train.nproc", "train.dist_timeout_s", "train.max_minutes", "train.compile",
                     "train.optimizer_impl", "data.num_workers", "model.attn_impl", "model.fused_proj",
                     "model.trim_text_padding", "model.grad_checkpointing", "model.mlp_recompute_act",
                     "tracking.")


def resume_key(configs: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration a checkpoint must match to be resumed (stored in every checkpoint).

    Args:
        configs: section name -> config dataclass (or dict), e.g. `{"base": ..., "model": ..., "train": ...}`.

    Returns:
        `{"model.depths": "[2, 2]", ...}`: the flat view of `configs` without the keys in `RESUMABLE_CHANGES`.
    """
    flat = flat_dict({k: to_dict(v) for k, v in configs.items()})
    return {k: v for k, v in flat.items() if not k.startswith(RESUMABLE_CHANGES)}


def stale_reason(state: dict[str, Any] | None, run_config: dict[str, Any] | None) -> str:
    """Why a checkpoint must not be resumed ('' when it may): a finished run, or a different configuration."""
    if state is None:
        return ""
    if state["plan_fixed"] and state["step"] >= state["planned_steps"]:
        return "that run finished (a rerun trains again)"
    if run_config is not None and state.get("config") != run_config:
        old = state.get("config") or {}
        keys = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
        return f"the configuration changed ({', '.join(keys[:5])})"
    return ""


def will_resume(checkpoint_dir: str | Path | None, run_config: dict[str, Any] | None, cfg: TrainConfig) -> bool:
    """Whether `fit` with these arguments continues from the latest checkpoint in `checkpoint_dir`.

    The train stage asks before it opens its MLflow run: a resumed training continues its run, a fresh one (a
    finished run, a changed configuration) gets a new run, so a retrain never lands in the old run's record.
    """
    if checkpoint_dir is None or not cfg.resume:
        return False
    state = ckpt.load_latest(Path(checkpoint_dir) / "checkpoints", mmap=True)  # `fit` reads the tensors later
    return state is not None and not stale_reason(state, run_config)
