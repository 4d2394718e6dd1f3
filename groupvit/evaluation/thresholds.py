"""Background thresholds: which one each data set is scored at, and the tuned-threshold file `thresholds.json`.

`groupvit evaluate` writes `<evaluate.output_dir>/thresholds.json`; `groupvit segment` (and any demo) reads it back:

    {"<model name>": {"bg_thresh": 0.5, "data_set": "synth_val", "model": "data/model", "weights_sha256": "<hex>"}}

Each threshold is the best of the first swept data set of that model and carries the SHA-256 of the weights it was
tuned on (`groupvit.checkpoint.weights_digest`), so a model retrained or replaced since never gets a stale value.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from groupvit.atomic import atomic_write
from groupvit.errors import DataError
from groupvit.evaluation.config import SegmentationSpec
from groupvit.evaluation.datasets import DEFAULT_BG_THRESH

THRESHOLDS_FILE = "thresholds.json"  # in evaluate.output_dir

log = logging.getLogger(__name__)


class TunedModel(Protocol):
    """What a tuned threshold records of its model (`groupvit.evaluation.inference.LoadedModel`)."""

    name: str
    path: Path
    digest: str


def bg_thresh_for(spec: SegmentationSpec, results: dict[str, Any], model: str) -> float:
    """The threshold `model` is scored at on `spec`: the best swept one of `spec.bg_thresh_from`, else `bg_thresh`,
    else the layout's default (VOC 0.95, Context 0.35, COCO-Object 0.95).

    Args:
        spec: the data set.
        results: the metrics so far (`{"<data set>": {"<model>": entry}}`) holding the earlier data sets.
        model: the model's name.

    Raises:
        DataError: `bg_thresh_from` names no earlier data set with a sweep for this model.
    """
    if spec.bg_thresh_from:
        source = results.get(spec.bg_thresh_from, {}).get(model, {})
        if "best_bg_thresh" not in source:
            raise DataError(f"evaluate.segmentation.{spec.name}.bg_thresh_from: {spec.bg_thresh_from!r} is not "
                            f"an earlier data set with a threshold sweep")
        return source["best_bg_thresh"]
    return spec.bg_thresh if spec.bg_thresh is not None else DEFAULT_BG_THRESH[spec.layout]


def tuned_thresholds(segmentation: Sequence[SegmentationSpec], models: Sequence[TunedModel],
                     results: dict[str, Any]) -> dict[str, Any]:
    """Each model's threshold from the first swept data set it was scored on, with the digest of its weights.

    Args:
        segmentation: the configured data sets, in order (`evaluate.segmentation`).
        models: the evaluated models.
        results: the metrics of the run.
    """
    out: dict[str, Any] = {}
    for spec in segmentation:
        for m in models:
            entry = results.get(spec.name, {}).get(m.name)
            if spec.sweep and isinstance(entry, dict) and m.name not in out:
                out[m.name] = {"bg_thresh": entry["best_bg_thresh"], "data_set": spec.name, "model": str(m.path),
                               "weights_sha256": m.digest}
    return out


def write_thresholds(output_dir: str | os.PathLike[str], tuned: dict[str, Any]) -> Path:
    """Write `tuned` (from `tuned_thresholds`) to `<output_dir>/thresholds.json` atomically; returns the path."""
    return atomic_write(Path(output_dir) / THRESHOLDS_FILE, json.dumps(tuned, indent=2) + "\n")


def tuned_threshold(output_dir: str | os.PathLike[str], digest: str) -> tuple[float, str] | None:
    """(threshold, data set) tuned for the weights with this digest, or None (no file, or none for these weights).

    Args:
        output_dir: the folder of `thresholds.json` (`evaluate.output_dir`).
        digest: `weights_digest` of the model about to segment.

    Raises:
        DataError: the file is not a JSON object, or the matching entry's `bg_thresh` is not a number in [0, 1].
    """
    path = Path(output_dir) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        entries = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON (written by groupvit evaluate); pass --bg-thresh") from None
    if not isinstance(entries, dict):
        raise DataError(f"{path}: expected an object of models (written by groupvit evaluate), found "
                        f"{type(entries).__name__}; pass --bg-thresh")
    for name, entry in entries.items():
        if isinstance(entry, dict) and entry.get("weights_sha256") == digest:
            value = entry.get("bg_thresh")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise DataError(f"{path}: {name}.bg_thresh: expected a number in [0, 1], found {value!r}")
            return float(value), entry.get("data_set", name)
    stale = [str(e.get("model")) for e in entries.values() if isinstance(e, dict)]
    log.warning("%s: no threshold tuned for these weights (tuned for %s; retrained since `groupvit evaluate`?)",
                path, ", ".join(stale) or "no model")
    return None
