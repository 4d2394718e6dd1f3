"""`groupvit evaluate`: zero-shot semantic segmentation (mIoU) and classification of one or more trained models.

DVC stage `evaluate` (dvc.yaml; after `train` and `train_baseline`). Writes `data/eval/`: pictures/*.png,
per_class_iou.csv (all data sets), thresholds.json (`groupvit.evaluation.thresholds`), resolved_config.yaml; and
`metrics/evaluate.json`, `metrics/per_class_iou.csv` (the report data set, for `dvc plots`). This module is the
orchestration (config, files, logs, MLflow); the work is in `groupvit.evaluation` (`inference`: models and
segmenters, `runner`: the dataset loops, `results`: the figures and tables, `visualize`: the pictures).

`metrics/evaluate.json`: `{"<data set>": {"<model>": {"miou", "pixel_accuracy", "mean_accuracy", "bg_thresh",
"oracle_miou", "prompt_cosine", "images_per_s", ...}, "all_background_miou": ...}, "classification": {...},
"comparison": {"<data set>": {"<model>_over_<baseline>": ratio}}}`. MLflow: one run `evaluate` with the same figures
as metrics (`<data set>/<model>/<name>`), the pictures and the tables as artifacts, tagged with the model's
registered version when `data/model/mlflow.json` exists and belongs to the weights there (else a warning, no tags).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from groupvit.atomic import atomic_write
from groupvit.config import save_resolved
from groupvit.evaluation.classification import templates_of
from groupvit.evaluation.config import ClassificationSpec, EvaluateConfig, SegmentationSpec, check_config, skipped
from groupvit.evaluation.datasets import ImageFolderDataset, SegmentationDataset, SingleObjectDataset
from groupvit.evaluation.inference import LoadedModel, load_models, make_segmenter, segmentation_settings
from groupvit.evaluation.metrics import all_background_miou
from groupvit.evaluation.results import (
    classification_entry,
    comparison,
    finite,
    per_class_csv,
    per_class_rows,
    segmentation_entry,
)
from groupvit.evaluation.runner import evaluate_classification, evaluate_segmentation
from groupvit.evaluation.segmentation import Segmenter
from groupvit.evaluation.thresholds import bg_thresh_for, tuned_thresholds, write_thresholds
from groupvit.evaluation.visualize import write_pictures
from groupvit.model import IMAGENET_MEAN, IMAGENET_STD
from pipelines.common import load, load_base, run_stage, stage_parser
from pipelines.tracking import mlflow_logger

log = logging.getLogger("groupvit.evaluate")


def run_segmentation(cfg: EvaluateConfig, models: list[LoadedModel], spec: SegmentationSpec, results: dict[str, Any],
                     rows: list[dict[str, Any]]) -> tuple[SegmentationDataset, dict[str, Segmenter]]:
    """Evaluate every model on one data set into `results` and `rows`; returns the data set and each Segmenter."""
    ds = SegmentationDataset(spec.root, spec.layout, spec.split, spec.classes or None)
    section: dict[str, Any] = results.setdefault(spec.name, {})
    segmenters = {}
    for m in models:
        seg = make_segmenter(m, ds.class_names[1:], templates_of(cfg.templates, "evaluate.templates"),
                             segmentation_settings(cfg, spec), spec.background_prompts)
        segmenters[m.name] = seg
        thr = bg_thresh_for(spec, results, m.name)
        thresholds = sorted(set(spec.sweep) | {thr})
        log.info("%s / %s: %d images, %s mode, thresholds %s", spec.name, m.name, min(len(ds), spec.limit or
                 len(ds)), spec.mode, thresholds)
        run = evaluate_segmentation(seg, ds, thresholds, cfg.batch_size, spec.limit)
        entry = section[m.name] = segmentation_entry(run, thr, seg.text[:ds.num_classes - 1], bool(spec.sweep))
        section["all_background_miou"] = finite(100 * all_background_miou(run.matrices[thr].counts))
        rows += per_class_rows(spec.name, m.name, run.scores[thr])
        log.info("%s / %s: mIoU %.2f (bg_thresh %.2f), oracle %s, %.1f images/s", spec.name, m.name,
                 100 * run.scores[thr].miou, thr, entry.get("oracle_miou"), entry["images_per_s"])
    return ds, segmenters


def run_classification(cfg: EvaluateConfig, models: list[LoadedModel], spec: ClassificationSpec,
                       results: dict[str, Any]) -> None:
    """Zero-shot top-1 / top-5 of every model on one data set, into `results["classification"]`."""
    if spec.layout == "folder":
        ds: Any = ImageFolderDataset(spec.root)
    else:
        ds = SingleObjectDataset(SegmentationDataset(spec.root, "voc", spec.split))
    out = results.setdefault("classification", {}).setdefault(spec.name, {})
    for m in models:
        templates = templates_of(spec.templates, f"evaluate.classification.{spec.name}.templates")
        text = m.text_embeddings(ds.class_names, templates)
        acc = evaluate_classification(m.encode_image, text, ds, spec.resize, spec.crop, IMAGENET_MEAN, IMAGENET_STD,
                                      cfg.batch_size, spec.limit)
        out[m.name] = classification_entry(acc)
        log.info("classification %s / %s: top-1 %.2f top-5 %.2f (%d images)", spec.name, m.name, acc["top1"],
                 acc["top5"], acc["num_images"])


def evaluate(cfg: EvaluateConfig, log_run: Callable[[dict, list[Path], list[Path]], None] | None = None
             ) -> dict[str, Any]:
    """Run every data set for every model; write metrics, tables and pictures; hand them to `log_run`."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = load_models(cfg.models, cfg.precision)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    done: dict[str, tuple[SegmentationDataset, dict[str, Segmenter]]] = {}
    for spec in [*cfg.segmentation, *cfg.classification]:
        if skipped(spec):
            log.info("data set %s: %s not found, skipped (optional)", spec.name, spec.root)
        elif isinstance(spec, SegmentationSpec):
            done[spec.name] = run_segmentation(cfg, models, spec, results, rows)
        else:
            run_classification(cfg, models, spec, results)
    report = cfg.report or (list(done)[-1] if done else "")
    pictures: list[Path] = []
    out = Path(cfg.output_dir)
    if report:
        ratios = comparison(results[report], [m.name for m in models], cfg.baseline)
        if ratios is not None:
            results.setdefault("comparison", {})[report] = ratios
        ds, segs = done[report]
        thresholds = {m: results[report][m]["bg_thresh"] for m in segs}
        pictures = write_pictures(out / "pictures", ds, segs, report, thresholds, cfg.num_pictures)
    tables = [atomic_write(out / "per_class_iou.csv", per_class_csv(rows))]
    if report:
        tables.append(atomic_write(cfg.per_class_file, per_class_csv(rows, report)))
    write_thresholds(out, tuned_thresholds(cfg.segmentation, models, results))
    atomic_write(cfg.metrics_file, json.dumps(results, indent=2) + "\n")  # last: metrics mean a complete run
    if log_run is not None:
        log_run(results, pictures, tables)
    return results


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("evaluate", "zero-shot semantic segmentation (mIoU) and classification of trained models")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = p.parse_args(argv)

    def body() -> int:
        from pipelines.tracking import TrackingConfig, check_reachable, resolve_uri

        cfg = load(EvaluateConfig, args, "evaluate")
        tracking = load(TrackingConfig, args, "tracking")
        check_config(cfg)
        if not args.no_tracking:  # as train: an unreachable server fails now, not after the evaluation
            check_reachable(resolve_uri(tracking))
        seed = load_base(args).seed
        torch.manual_seed(seed)
        results = evaluate(cfg, None if args.no_tracking else mlflow_logger(tracking, cfg, seed))
        save_resolved(Path(cfg.output_dir) / "resolved_config.yaml", evaluate=cfg, tracking=tracking)
        for name, section in results.items():
            for model, entry in section.items():
                if isinstance(entry, dict) and "miou" in entry:
                    print(f"{name:>16} {model:>16}  mIoU {entry['miou']}  (bg_thresh {entry['bg_thresh']})")
        print(f"metrics: {cfg.metrics_file}, pictures: {Path(cfg.output_dir) / 'pictures'}")
        return 0

    return run_stage(body)
