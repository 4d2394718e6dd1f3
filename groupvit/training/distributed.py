"""Everything about processes in one place: rank and world from torchrun's environment, process group set-up and
tear-down, seeds offset by rank, and small collectives used on log steps.

Library code elsewhere receives `rank`/`world_size` as arguments; only this module reads the environment.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its machine, processes in total and on its machine."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, writes checkpoints and talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistInfo:
    """Read `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE` (set by torchrun); a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def device_for(info: DistInfo) -> torch.device:
    """This process's GPU (`cuda:<local rank>`) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when started by torchrun (NCCL on GPUs, gloo on CPU); a no-op for one process.

    The timeout bounds every collective: if a peer dies without torchrun noticing (e.g. on another machine), the
    survivors fail with an error after `timeout_s` instead of hanging forever.
    """
    info = dist_env()
    # under torchrun a world of one still joins a group, so a 1-GPU run exercises the same NCCL set-up as many
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (info.distributed or under_torchrun) and not dist.is_initialized():
        device = device_for(info)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return info


def destroy_distributed() -> None:
    """Leave the process group (safe to call when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch with `seed + rank`, as the reference: ranks draw different noise and dropout."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of `t` over ranks (in place); identity for one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Max of `t` over ranks (in place); identity for one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` (used for RNG states at checkpoint time only)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
