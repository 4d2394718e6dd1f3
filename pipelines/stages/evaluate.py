"""`groupvit evaluate`: zero-shot semantic segmentation (mIoU) and classification of one or more trained models.

DVC stage (for dvc.yaml; runs after `train`, and after `train_baseline` when the baseline is evaluated):

    cmd: groupvit evaluate
    deps: [pipelines/stages/evaluate.py, groupvit/evaluation, groupvit/model, data/model, data/baseline_model,
           data/synth/val, data/synth/test]
    params: [base.seed, evaluate, tracking]
    outs: [data/eval]                        # pictures/*.png, per_class_iou.csv (all data sets), thresholds.json,
                                             # resolved_config.yaml
    metrics: [metrics/evaluate.json: {cache: false}]
    plots:
      - metrics/per_class_iou.csv: {cache: false, x: class, y: [groupvit, vit_pixelwise], template: bar_horizontal}

`metrics/evaluate.json`: `{"<data set>": {"<model>": {"miou", "pixel_accuracy", "mean_accuracy", "bg_thresh",
"oracle_miou", "prompt_cosine", "images_per_s", ...}, "all_background_miou": ...}, "classification": {...},
"comparison": {"<data set>": {"<model>_over_<baseline>": ratio}}}`. MLflow: one run `evaluate` with the same figures
as metrics (`<data set>/<model>/<name>`), the pictures and the tables as artifacts, tagged with the model's
registered version when `data/model/mlflow.json` exists and belongs to the weights there (else a warning, no tags).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from groupvit.checkpoint import weights_digest
from groupvit.config import flat_dict, param, save_resolved
from groupvit.errors import ConfigError, DataError
from groupvit.evaluation.datasets import (DEFAULT_BG_THRESH, ImageFolderDataset, SegmentationDataset,
                                          SingleObjectDataset, load_class_names)
from groupvit.evaluation.limits import MAX_ASPECT_RATIO, MAX_LONG_SIDE, MAX_PIXELS
from groupvit.evaluation.runner import evaluate_classification, evaluate_segmentation
from pipelines.common import load, load_base, run_stage, stage_parser

THRESHOLDS_FILE = "thresholds.json"  # in output_dir: the tuned threshold per model, read by `groupvit segment`

log = logging.getLogger("groupvit.evaluate")


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a `load_pretrained` folder."""

    name: str = param(help="name in the metrics (e.g. groupvit, vit_pixelwise)")
    path: str = param(help="folder with model.safetensors + config.json")
    optional: bool = param(False, help="skip (with a log line) when the folder does not exist")


@dataclass(frozen=True)
class SegmentationSpec:
    """One segmentation data set and how images reach the model (reference: slide, 448 / 448 / 224)."""

    name: str = param(help="name in the metrics (e.g. synth_test, voc)")
    root: str = param(help="data set root")
    layout: str = param("voc", choices=("voc", "context", "coco_object"))
    split: str = param("val", help="split name (val2017 for COCO-Object)")
    classes: str = param("", help="class list file or resource; '' = <root>/class_names.txt, else the layout's")
    bg_thresh: float | None = param(None, ge=0, le=1, help="background threshold; null = layout default "
                                                           "(VOC 0.95, Context 0.35, COCO-Object 0.95)")
    bg_thresh_from: str = param("", help="use, per model, the best swept threshold of this earlier data set")
    sweep: tuple[float, ...] = param((), ge=0, le=1, help="also score these thresholds (tuning on validation)")
    mode: str = param("slide", choices=("whole", "slide"))
    short_side: int = param(448, ge=0, help="resize the short side before the model (0 = keep the size)")
    long_side: int = param(2048, ge=1, help="cap of the long side after resizing; every image is also capped at "
                                            f"{MAX_LONG_SIDE} px long side and {MAX_PIXELS:,} px in all, and one "
                                            f"more elongated than {MAX_ASPECT_RATIO}:1 is an error (inference_size)")
    crop: int = param(448, ge=1, help="sliding-window crop")
    stride: int = param(224, ge=1, help="sliding-window stride")
    limit: int = param(0, ge=0, help="evaluate only the first N images (0 = all)")
    optional: bool = param(False, help="skip (with a log line) when the root does not exist")
    background_prompts: tuple[str, ...] = param((), help="names of kinds of background (e.g. grass, sky) prompted "
                                                        "as extra classes whose pixels become background "
                                                        "(departure from the reference: empty)")


@dataclass(frozen=True)
class ClassificationSpec:
    """One zero-shot classification data set: an image folder or the single-object images of a segmentation set."""

    name: str = param(help="name in the metrics")
    root: str = param(help="image folder root (root/<class>/<image>) or segmentation data set root")
    layout: str = param("folder", choices=("folder", "single_object"))
    split: str = param("val", help="split of a single_object (VOC layout) data set")
    templates: str = param("imagenet_templates_subset_7.txt", help="template file/resource, or one template")
    resize: int = param(256, ge=0, help="short side before the centre crop (0 = keep)")
    crop: int = param(224, ge=0, help="centre crop (0 = none)")
    limit: int = param(0, ge=0)
    optional: bool = param(False)


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` section of params.yaml."""

    models: tuple[ModelSpec, ...] = param((ModelSpec("groupvit", "data/model"),))
    segmentation: tuple[SegmentationSpec, ...] = param(())
    classification: tuple[ClassificationSpec, ...] = param(())
    templates: str = param("a photo of a {}.", help="segmentation prompt template, or a template file/resource")
    top_k: int = param(5, ge=0, help="keep the top-k classes of the whole-image embedding (0 = all)")
    assignment: str = param("hard", choices=("hard", "soft"), help="hard: one group per pixel (reference)")
    precision: str = param("fp32", choices=("fp32", "bf16"), help="autocast of the image encoder")
    batch_size: int = param(32, ge=1, help="images per forward (whole mode, same-size images)")
    num_pictures: int = param(8, ge=0, help="pictures of the first N images of the report data set")
    report: str = param("", help="data set of the pictures, per-class table and comparison ('' = the last)")
    baseline: str = param("vit_pixelwise", help="model the others are compared with (ratio of mIoU)")
    output_dir: str = param("data/eval")
    metrics_file: str = param("metrics/evaluate.json")
    per_class_file: str = param("metrics/per_class_iou.csv")
    threads: int = param(0, ge=0, help="torch CPU threads (0 = torch default)")


def templates_of(value: str) -> list[str]:
    """One template, or a `.txt` file/resource with one per line."""
    return load_class_names(value) if value.endswith(".txt") else [value]


class LoadedModel:
    """A model with the callables evaluation needs (no grad, eval mode, optional bf16 autocast)."""

    def __init__(self, spec: ModelSpec, precision: str):
        import groupvit

        self.name, self.path = spec.name, Path(spec.path)
        self.model = groupvit.load_pretrained(self.path).eval()
        self.bf16 = precision == "bf16"
        self.logit_scale = float(self.model.logit_scales()[0].detach())
        self.context_length = self.model.cfg.context_length

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the weights, which ties a tuned threshold to them (thresholds.json); computed when asked."""
        return weights_digest(self.model)

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    @torch.no_grad()
    def segmentation_outputs(self, pixels: torch.Tensor) -> dict[str, Any]:
        with self._autocast():
            out = self.model.segmentation_outputs(pixels)
        return {"image": out["image"].float(), "groups": out["groups"].float(),
                "soft_maps": [a.float() for a in out["soft_maps"]], "grid": out["grid"]}

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_image(pixels).float()

    @torch.no_grad()
    def text_embeddings(self, names: list[str], templates: list[str]) -> torch.Tensor:
        import groupvit
        from groupvit.evaluation.classification import class_embeddings

        return class_embeddings(self.model.encode_text, lambda t: groupvit.tokenize(t, self.context_length),
                                names, templates)


def load_models(cfg: EvaluateConfig) -> list[LoadedModel]:
    models = []
    for spec in cfg.models:
        if not Path(spec.path).exists():
            if spec.optional:
                log.info("model %s: %s not found, skipped (optional)", spec.name, spec.path)
                continue
            raise DataError(f"evaluate.models: model folder {spec.path} ({spec.name}) not found")
        models.append(LoadedModel(spec, cfg.precision))
    if not models:
        raise DataError("evaluate.models: no model to evaluate")
    return models


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def run_segmentation(cfg: EvaluateConfig, models: list[LoadedModel], spec: SegmentationSpec,
                     results: dict[str, Any], tables: list[dict[str, Any]]) -> tuple[SegmentationDataset, dict]:
    """Evaluate every model on one data set; returns the data set and each model's Segmenter."""
    from groupvit.evaluation.diagnostics import mean_pairwise_cosine
    from groupvit.evaluation.segmentation import Segmenter, SegmentationSettings
    from groupvit.model import IMAGENET_MEAN, IMAGENET_STD

    ds = SegmentationDataset(spec.root, spec.layout, spec.split, spec.classes or None)
    settings = SegmentationSettings(spec.mode, spec.short_side, spec.long_side, spec.crop, spec.stride, cfg.top_k,
                                    cfg.assignment == "hard")
    section: dict[str, Any] = results.setdefault(spec.name, {})
    segmenters = {}
    for m in models:
        names = ds.class_names[1:] + list(spec.background_prompts)
        text = m.text_embeddings(names, templates_of(cfg.templates))
        seg = Segmenter(m.segmentation_outputs, text, m.logit_scale, settings, IMAGENET_MEAN, IMAGENET_STD,
                        background_prompts=len(spec.background_prompts))
        segmenters[m.name] = seg
        if spec.bg_thresh_from:
            source = results.get(spec.bg_thresh_from, {}).get(m.name, {})
            if "best_bg_thresh" not in source:
                raise DataError(f"evaluate.segmentation.{spec.name}.bg_thresh_from: {spec.bg_thresh_from!r} is not "
                                f"an earlier data set with a threshold sweep")
            thr = source["best_bg_thresh"]
        else:
            thr = spec.bg_thresh if spec.bg_thresh is not None else DEFAULT_BG_THRESH[spec.layout]
        thresholds = sorted(set(spec.sweep) | {thr})
        log.info("%s / %s: %d images, %s mode, thresholds %s", spec.name, m.name, min(len(ds), spec.limit or
                 len(ds)), spec.mode, thresholds)
        run = evaluate_segmentation(seg, ds, thresholds, cfg.batch_size, spec.limit)
        scores = run.scores[thr]
        entry: dict[str, Any] = {k: _finite(v) for k, v in scores.as_dict().items()}
        entry.update(bg_thresh=thr, prompt_cosine=_finite(mean_pairwise_cosine(text[:ds.num_classes - 1])),
                     images_per_s=round(run.num_images / max(run.seconds, 1e-9), 2), num_images=run.num_images)
        if run.oracle is not None:
            entry["oracle_miou"] = _finite(100 * run.oracle.miou)
            entry["groups_per_image"] = _finite(run.groups_per_image)
        if spec.sweep:
            best = run.best_threshold()
            entry.update(best_bg_thresh=best, best_miou=_finite(100 * run.scores[best].miou),
                         sweep={f"{t:g}": _finite(100 * run.scores[t].miou) for t in thresholds})
        section[m.name] = entry
        counts = run.matrices[thr].counts
        section["all_background_miou"] = _finite(100 * _all_background_miou(counts))
        for cls, iou in scores.iou.items():
            tables.append({"dataset": spec.name, "model": m.name, "class": cls, "iou": _finite(100 * iou)})
        log.info("%s / %s: mIoU %.2f (bg_thresh %.2f), oracle %s, %.1f images/s", spec.name, m.name,
                 100 * scores.miou, thr, entry.get("oracle_miou"), entry["images_per_s"])
    return ds, segmenters


def _all_background_miou(counts: torch.Tensor) -> float:
    """mIoU of predicting background everywhere, from a confusion matrix's ground-truth totals."""
    gt = counts.sum(dim=1).double()
    ious = [gt[0] / gt.sum()] + [0.0 for c in range(1, len(gt)) if gt[c] > 0]
    return float(sum(ious) / len(ious))


def run_classification(cfg: EvaluateConfig, models: list[LoadedModel], spec: ClassificationSpec,
                       results: dict[str, Any]) -> None:
    from groupvit.model import IMAGENET_MEAN, IMAGENET_STD

    if spec.layout == "folder":
        ds: Any = ImageFolderDataset(spec.root)
    else:
        ds = SingleObjectDataset(SegmentationDataset(spec.root, "voc", spec.split))
    out = results.setdefault("classification", {}).setdefault(spec.name, {})
    for m in models:
        text = m.text_embeddings(ds.class_names, templates_of(spec.templates))
        acc = evaluate_classification(m.encode_image, text, ds, spec.resize, spec.crop, IMAGENET_MEAN, IMAGENET_STD,
                                      cfg.batch_size, spec.limit)
        out[m.name] = {k: _finite(v) if isinstance(v, float) else v for k, v in acc.items()}
        log.info("classification %s / %s: top-1 %.2f top-5 %.2f (%d images)", spec.name, m.name, acc["top1"],
                 acc["top5"], acc["num_images"])


def write_pictures(cfg: EvaluateConfig, ds: SegmentationDataset, segmenters: dict, spec: SegmentationSpec,
                   thresholds: dict[str, float]) -> list[Path]:
    from groupvit.evaluation.segmentation import stage_group_maps
    from groupvit.evaluation.visualize import segmentation_figure, write_png

    paths = []
    folder = Path(cfg.output_dir) / "pictures"
    for i in range(min(cfg.num_pictures, len(ds))):
        sample = ds[i]
        for name, seg in segmenters.items():
            pred = seg.predict(sample.image[None], thresholds[name])[0]
            groups = stage_group_maps(seg, sample.image)
            png = segmentation_figure(sample.image, pred, ds.class_names, sample.mask, groups,
                                      title=f"{spec.name} {sample.id} - {name}")
            paths.append(write_png(folder / f"{spec.name}_{i:03d}_{sample.id}_{name}.png", png))
    return paths


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def flat_metrics(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """`{"synth_test/groupvit/miou": 61.2, ...}` for MLflow (numbers only)."""
    out: dict[str, float] = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_metrics(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


def tuned_thresholds(cfg: EvaluateConfig, models: list[LoadedModel], results: dict[str, Any]) -> dict[str, Any]:
    """Each model's threshold from the first swept data set, with the digest of the weights it was tuned for."""
    out: dict[str, Any] = {}
    for spec in cfg.segmentation:
        for m in models:
            entry = results.get(spec.name, {}).get(m.name)
            if spec.sweep and isinstance(entry, dict) and m.name not in out:
                out[m.name] = {"bg_thresh": entry["best_bg_thresh"], "data_set": spec.name, "model": str(m.path),
                               "weights_sha256": m.digest}
    return out


def _skipped(spec: SegmentationSpec | ClassificationSpec) -> bool:
    """An optional data set whose root is absent: skipped with a log line."""
    return spec.optional and not Path(spec.root).exists()


def check_config(cfg: EvaluateConfig) -> None:
    """Fail before any work on what would otherwise stop the run after earlier data sets were evaluated: names that
    refer to no data set evaluated before them, absent data sets, split files or class lists, unreadable templates.

    Raises:
        ConfigError: a duplicated data set name, `bg_thresh_from` or `report` naming no suitable data set.
        DataError, FileNotFoundError: a non-optional data set root or a template file is missing.
    """
    if not cfg.segmentation and not cfg.classification:
        raise DataError("evaluate: no data set configured (evaluate.segmentation / evaluate.classification)")
    names = [s.name for s in cfg.segmentation]
    for section, specs in (("segmentation", cfg.segmentation), ("classification", cfg.classification)):
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ConfigError(f"evaluate.{section}: data set name {spec.name!r} appears twice")
            seen.add(spec.name)
            if not spec.optional and not Path(spec.root).exists():
                raise DataError(f"evaluate.{section}.{spec.name}.root: {spec.root} not found (or set optional: true)")
    evaluated: dict[str, SegmentationSpec] = {}
    for spec in cfg.segmentation:
        source = evaluated.get(spec.bg_thresh_from)
        if spec.bg_thresh_from and (source is None or not source.sweep):
            raise ConfigError(f"evaluate.segmentation.{spec.name}.bg_thresh_from: {spec.bg_thresh_from!r} is not an "
                              f"earlier evaluated data set with a threshold sweep ({', '.join(evaluated) or 'none'})")
        if not _skipped(spec):
            evaluated[spec.name] = spec
    if cfg.report and cfg.report not in evaluated:
        skipped = " (optional, its root is absent)" if cfg.report in names else ""
        raise ConfigError(f"evaluate.report: {cfg.report!r} is not an evaluated segmentation data set{skipped} "
                          f"({', '.join(evaluated) or 'none'})")
    for spec in evaluated.values():  # split files, class lists: cheap to read, fatal to find missing later
        SegmentationDataset(spec.root, spec.layout, spec.split, spec.classes or None)
    templates_of(cfg.templates)
    for cspec in cfg.classification:
        templates_of(cspec.templates)
        if not _skipped(cspec) and cspec.layout == "folder":
            ImageFolderDataset(cspec.root)
        elif not _skipped(cspec):  # the single-object filter reads every mask: only the split is checked here
            SegmentationDataset(cspec.root, "voc", cspec.split)


def evaluate(cfg: EvaluateConfig, log_run: Callable[[dict, list[Path], list[Path]], None] | None = None
             ) -> dict[str, Any]:
    """Run every data set for every model; write metrics, tables and pictures; hand them to `log_run`."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = load_models(cfg)
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    done: dict[str, tuple[SegmentationDataset, dict, SegmentationSpec]] = {}
    for spec in cfg.segmentation:
        if _skipped(spec):
            log.info("data set %s: %s not found, skipped (optional)", spec.name, spec.root)
            continue
        ds, segs = run_segmentation(cfg, models, spec, results, rows)
        done[spec.name] = (ds, segs, spec)
    for cspec in cfg.classification:
        if _skipped(cspec):
            log.info("data set %s: %s not found, skipped (optional)", cspec.name, cspec.root)
            continue
        run_classification(cfg, models, cspec, results)
    report = cfg.report or (list(done)[-1] if done else "")
    pictures: list[Path] = []
    if report:
        base = results[report].get(cfg.baseline, {}).get("miou")
        if base:
            results.setdefault("comparison", {})[report] = {
                f"{m.name}_over_{cfg.baseline}": round(results[report][m.name]["miou"] / base, 4)
                for m in models if m.name != cfg.baseline and results[report][m.name]["miou"] is not None}
        ds, segs, spec = done[report]
        pictures = write_pictures(cfg, ds, segs, spec, {m: results[report][m]["bg_thresh"] for m in segs})
    out = Path(cfg.output_dir)
    tables = [out / "per_class_iou.csv"]
    write_atomic(tables[0], per_class_csv(rows))
    if report:
        write_atomic(Path(cfg.per_class_file), per_class_csv(rows, report))
        tables.append(Path(cfg.per_class_file))
    write_atomic(out / THRESHOLDS_FILE, json.dumps(tuned_thresholds(cfg, models, results), indent=2) + "\n")
    write_atomic(Path(cfg.metrics_file), json.dumps(results, indent=2) + "\n")
    if log_run is not None:
        log_run(results, pictures, tables)
    return results


def mlflow_logger(tracking_cfg: Any, cfg: EvaluateConfig, seed: int) -> Callable[[dict, list[Path], list[Path]], None]:
    """Log figures, pictures and tables to one MLflow run, tagged with the evaluated model's registered version."""
    def log_run(results: dict, pictures: list[Path], tables: list[Path]) -> None:
        import mlflow

        from pipelines.tracking import git_commit, read_model_record, start_run

        tags = {"stage": "evaluate", "git_commit": git_commit()}
        for spec in cfg.models:
            try:  # a stale or broken record loses the tags, never the evaluation
                meta = read_model_record(spec.path) if Path(spec.path).is_dir() else None
            except DataError as e:
                log.warning("%s: not tagged with its MLflow record: %s", spec.name, e)
                meta = None
            tags.update({f"{spec.name}.{k}": str(v) for k, v in (meta or {}).items()
                         if not isinstance(v, (dict, list))})
        with start_run(tracking_cfg, "evaluate", tags=tags, log_system_metrics=False):
            mlflow.log_params({k: str(v)[:500] for k, v in flat_dict({"evaluate": cfg}).items()})
            mlflow.log_param("base.seed", seed)
            mlflow.log_metrics(flat_metrics(results))
            for p in pictures:
                mlflow.log_artifact(str(p), artifact_path="pictures")
            for t in [*tables, Path(cfg.metrics_file)]:
                mlflow.log_artifact(str(t), artifact_path="tables")
    return log_run


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
