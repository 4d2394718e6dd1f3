"""Resumable checkpoints, written atomically (the final model folder: `groupvit.checkpoint.save_pretrained`).

Layout of a run folder (`data/train/`):

    checkpoints/step_000100.pt   model, optimizer, grad scaler, schedule, step, plan, per-rank RNG states
    checkpoints/step_000200.pt   (the last `keep` are kept)
    checkpoints/latest           text file naming the newest complete checkpoint

Every file is written with `groupvit.atomic.atomic_write` (a temporary name in the same folder, fsynced, renamed
into place), so a crash or a full disk mid-write leaves the previous checkpoint and pointer untouched. Checkpoints
hold only tensors and plain Python types (RNG states as tensors), so `torch.load(..., weights_only=True)` reads them:
no pickled code is ever executed.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupvit.atomic import atomic_write

log = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"^step_(\d{6,})\.pt$")


# ---- RNG states as tensors ---------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states, as tensors and plain numbers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor(py_state, dtype=torch.int64), "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)), "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss), "numpy_name": str(np_name),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- resumable checkpoints ---------------------------------------------------------------------------------------

def checkpoint_path(folder: str | os.PathLike[str], step: int) -> Path:
    return Path(folder) / f"step_{step:06d}.pt"


def save_checkpoint(folder: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as `step_XXXXXX.pt`, then point `latest` at it, then prune to the newest `keep` checkpoints.

    The pointer moves only after the checkpoint is complete on disk; on any error the previous pair is untouched.
    """
    folder = Path(folder)
    path = checkpoint_path(folder, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(folder / "latest", path.name + "\n")
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))
    for old in steps[:-keep]:
        checkpoint_path(folder, old).unlink(missing_ok=True)
    return path


def load_latest(folder: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                mmap: bool = False) -> dict[str, Any] | None:
    """The newest readable checkpoint in `folder` (the one `latest` names, else the newest step file); None if none.

    A checkpoint that fails to load (truncated by a crash outside our atomic write, e.g. a copied folder) is
    skipped with a warning in favour of the previous one. `mmap=True` maps the tensors instead of reading them, for
    callers that only look at the plan and the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if _STEP_FILE.match(p.name)), reverse=True)
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to an older checkpoint
            log.warning("skipping unreadable checkpoint %s (%s)", path, e)
            continue
        state["path"] = str(path)
        return state
    return None


def move_aside(folder: str | os.PathLike[str]) -> Path | None:
    """Rename `folder` to `<folder>_previous` (replacing an older one), so a fresh run starts empty."""
    folder = Path(folder)
    if not folder.exists():
        return None
    previous = folder.with_name(folder.name + "_previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.replace(folder, previous)
    return previous
