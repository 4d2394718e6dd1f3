"""groupvit.evaluation.results: the entries of metrics/evaluate.json, the per-class tables and MLflow's flat view."""
from __future__ import annotations

import math

import torch

from groupvit.evaluation.metrics import ConfusionMatrix, SegmentationScores
from groupvit.evaluation.results import (
    classification_entry,
    comparison,
    finite,
    flat_metrics,
    per_class_csv,
    per_class_rows,
    segmentation_entry,
)
from groupvit.evaluation.runner import SegmentationRun

NAMES = ["background", "cat", "dog"]


def scores(pred: list[int], target: list[int]) -> SegmentationScores:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm.result(NAMES)


TARGET = [0, 0, 1, 1, 2, 2]
RUN = SegmentationRun(thresholds=[0.2, 0.5], num_images=4, seconds=2.0, oracle=scores(TARGET, TARGET),
                      scores={0.2: scores([1, 1, 1, 1, 2, 2], TARGET), 0.5: scores([0, 0, 1, 0, 2, 2], TARGET)},
                      groups_per_image=3.5)


def test_finite_rounds_and_turns_nan_into_null():
    assert finite(12.345678) == 12.3457 and finite(math.nan) is None and finite(None) is None


def test_segmentation_entry_figures_and_key_order():
    prompts = torch.eye(2)  # orthogonal prompts: cosine 0
    entry = segmentation_entry(RUN, 0.5, prompts, swept=True)
    assert list(entry) == ["miou", "pixel_accuracy", "mean_accuracy", "bg_thresh", "prompt_cosine", "images_per_s",
                           "num_images", "oracle_miou", "groups_per_image", "best_bg_thresh", "best_miou", "sweep"]
    s = RUN.scores[0.5]
    assert entry["miou"] == round(100 * s.miou, 4) and entry["bg_thresh"] == 0.5 and entry["prompt_cosine"] == 0.0
    assert entry["images_per_s"] == 2.0 and entry["num_images"] == 4 and entry["oracle_miou"] == 100.0
    assert entry["best_bg_thresh"] == 0.5 and entry["best_miou"] == entry["miou"]  # 0.5 beats 0.2 here
    assert entry["sweep"] == {"0.2": round(100 * RUN.scores[0.2].miou, 4), "0.5": entry["miou"]}
    plain = segmentation_entry(SegmentationRun([0.2], {0.2: RUN.scores[0.2]}, None, 0, 0.0), 0.2, prompts, False)
    assert "sweep" not in plain and "oracle_miou" not in plain and plain["images_per_s"] == 0.0


def test_classification_entry_rounds_accuracies_and_keeps_the_count():
    assert classification_entry({"top1": 100 / 3, "top5": math.nan, "num_images": 3}) == {
        "top1": 33.3333, "top5": None, "num_images": 3}


def test_comparison_is_the_ratio_to_the_baseline():
    section = {"groupvit": {"miou": 30.0}, "vit_pixelwise": {"miou": 20.0}, "other": {"miou": None},
               "all_background_miou": 10.0}
    assert comparison(section, ["groupvit", "vit_pixelwise", "other"], "vit_pixelwise") == {
        "groupvit_over_vit_pixelwise": 1.5}
    assert comparison(section, ["groupvit"], "absent") is None
    assert comparison(dict(section, vit_pixelwise={"miou": 0.0}), ["groupvit"], "vit_pixelwise") is None


def test_per_class_tables_long_and_wide():
    rows = (per_class_rows("val", "groupvit", RUN.scores[0.5]) + per_class_rows("val", "base", RUN.scores[0.2])
            + per_class_rows("test", "groupvit", RUN.scores[0.2]))
    long = per_class_csv(rows).splitlines()
    assert long[0] == "dataset,model,class,iou" and len(long) == 1 + 9
    assert long[1] == f"val,groupvit,background,{round(100 * RUN.scores[0.5].iou['background'], 4)}"
    wide = per_class_csv(rows, "val").splitlines()
    assert wide[0] == "class,groupvit,base" and [r.split(",")[0] for r in wide[1:]] == NAMES
    # a class with no IoU (absent from truth and prediction) is an empty cell, not "None"
    empty = per_class_rows("x", "m", scores([0, 0], [0, 0]))
    assert per_class_csv(empty, "x").splitlines() == ["class,m", "background,100.0", "cat,", "dog,"]


def test_flat_metrics_keeps_numbers_only():
    results = {"val": {"groupvit": {"miou": 30.0, "sweep": {"0.5": 30.0}, "oracle_miou": None, "flag": True},
                       "all_background_miou": 10}, "note": "text"}
    assert flat_metrics(results) == {"val/groupvit/miou": 30.0, "val/groupvit/sweep/0.5": 30.0,
                                     "val/all_background_miou": 10.0}
