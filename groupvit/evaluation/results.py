"""The figures of an evaluation as `groupvit evaluate` reports them: entries of `metrics/evaluate.json`, the per-class
IoU tables (CSV) and the flat view MLflow logs. Pure functions of scores: nothing here reads or writes files."""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

import torch

from groupvit.evaluation.diagnostics import mean_pairwise_cosine
from groupvit.evaluation.metrics import SegmentationScores
from groupvit.evaluation.runner import SegmentationRun


def finite(x: float | None) -> float | None:
    """Rounded to 4 decimals for the JSON; NaN (no score, e.g. an empty data set) becomes None (`null`)."""
    return None if x is None or math.isnan(x) else round(float(x), 4)


def segmentation_entry(run: SegmentationRun, bg_thresh: float, prompts: torch.Tensor, swept: bool) -> dict[str, Any]:
    """One model's entry for one data set in `metrics/evaluate.json` (percent, rounded; key order as written).

    Args:
        run: the dataset loop's scores, one per threshold.
        bg_thresh: the threshold the headline figures are taken at.
        prompts: [C, D] normalised embeddings of the data set's class prompts (background prompts excluded).
        swept: whether the thresholds of `run` are a sweep: adds the best threshold, its mIoU and every mIoU.
    """
    scores = run.scores[bg_thresh]
    entry: dict[str, Any] = {k: finite(v) for k, v in scores.as_dict().items()}
    entry.update(bg_thresh=bg_thresh, prompt_cosine=finite(mean_pairwise_cosine(prompts)),
                 images_per_s=round(run.num_images / max(run.seconds, 1e-9), 2), num_images=run.num_images)
    if run.oracle is not None:
        entry["oracle_miou"] = finite(100 * run.oracle.miou)
        entry["groups_per_image"] = finite(run.groups_per_image)
    if swept:
        best = run.best_threshold()
        entry.update(best_bg_thresh=best, best_miou=finite(100 * run.scores[best].miou),
                     sweep={f"{t:g}": finite(100 * run.scores[t].miou) for t in run.thresholds})
    return entry


def classification_entry(accuracy: dict[str, float]) -> dict[str, Any]:
    """One model's entry for one classification data set: top-1 / top-5 rounded, the image count as is."""
    return {k: finite(v) if isinstance(v, float) else v for k, v in accuracy.items()}


def comparison(section: dict[str, Any], models: Sequence[str], baseline: str) -> dict[str, float] | None:
    """`{"<model>_over_<baseline>": mIoU ratio}` for one data set's section, or None without a baseline mIoU."""
    base = section.get(baseline, {}).get("miou")
    if not base:
        return None
    return {f"{m}_over_{baseline}": round(section[m]["miou"] / base, 4)
            for m in models if m != baseline and section[m]["miou"] is not None}


def per_class_rows(data_set: str, model: str, scores: SegmentationScores) -> list[dict[str, Any]]:
    """Rows (dataset, model, class, iou in percent) of one model on one data set, in class order."""
    return [{"dataset": data_set, "model": model, "class": cls, "iou": finite(100 * iou)}
            for cls, iou in scores.iou.items()]


def per_class_csv(rows: list[dict[str, Any]], dataset: str | None = None) -> str:
    """Long table (dataset, model, class, iou), or for one data set a wide one: class, <model>, ... (dvc plots)."""
    buf = io.StringIO()
    if dataset is None:
        w = csv.DictWriter(buf, fieldnames=["dataset", "model", "class", "iou"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    models = list(dict.fromkeys(r["model"] for r in rows if r["dataset"] == dataset))
    classes = list(dict.fromkeys(r["class"] for r in rows if r["dataset"] == dataset))
    table = {(r["model"], r["class"]): r["iou"] for r in rows if r["dataset"] == dataset}
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", *models])
    for c in classes:
        w.writerow([c, *["" if table[(m, c)] is None else table[(m, c)] for m in models]])
    return buf.getvalue()


# The few figures a runs table compares models by (MLflow columns, ablation children): metric name -> (which data
# set, which entry of a model's result). "test" is the report data set, "val" the one its threshold was tuned on.
HEADLINE = {"miou_test": ("test", "miou"), "miou_val": ("val", "best_miou"), "group_oracle": ("test", "oracle_miou"),
            "prompt_cosine": ("test", "prompt_cosine"), "pixel_accuracy_test": ("test", "pixel_accuracy")}


def headline_metrics(results: dict[str, Any], model: str, test: str, val: str = "") -> dict[str, float]:
    """`HEADLINE`'s figures of `model`: `{"miou_test": 68.45, "miou_val": 67.64, ...}` (absent ones left out).

    Args:
        results: the evaluation results (`metrics/evaluate.json`).
        model: the evaluated model's name.
        test: the report data set (held out).
        val: the data set its background threshold was tuned on ('' = none).
    """
    sets = {"test": results.get(test, {}).get(model, {}), "val": results.get(val, {}).get(model, {}) if val else {}}
    out = {}
    for name, (which, key) in HEADLINE.items():
        value = sets[which].get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"synth_test/groupvit/miou": 61.2, ...}` for MLflow (numbers only; None, booleans and text are left out)."""
    out: dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out
