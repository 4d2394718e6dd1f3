"""`EvaluateConfig`: the `evaluate` section of params.yaml (models, data sets, the reference's inference settings), and
`check_config`, which finds what would stop an evaluation half-way before any work is done."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from groupvit.config import param
from groupvit.errors import ConfigError, DataError
from groupvit.evaluation.limits import MAX_ASPECT_RATIO, MAX_LONG_SIDE, MAX_PIXELS


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
    layout: str = param("voc", choices=("voc", "context", "coco_object"),
                        help="folder layout and class list: PASCAL VOC, PASCAL Context or COCO-Object")
    split: str = param("val", help="split name (val2017 for COCO-Object)")
    classes: str = param("", help="class list file or resource; '' = <root>/class_names.txt, else the layout's")
    bg_thresh: float | None = param(None, ge=0, le=1, help="background threshold; null = layout default "
                                                           "(VOC 0.95, Context 0.35, COCO-Object 0.95)")
    bg_thresh_from: str = param("", help="use, per model, the best swept threshold of this earlier data set")
    sweep: tuple[float, ...] = param((), ge=0, le=1, help="also score these thresholds (tuning on validation)")
    mode: str = param("slide", choices=("whole", "slide"),
                      help="whole = one window over the resized image | slide = crop x crop windows every stride")
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
    layout: str = param("folder", choices=("folder", "single_object"),
                        help="folder = root/<class>/<image> | single_object = one-object images of a VOC-layout set")
    split: str = param("val", help="split of a single_object (VOC layout) data set")
    templates: str = param("imagenet_templates_subset_7.txt", help="template file/resource, or one template")
    resize: int = param(256, ge=0, help="short side before the centre crop (0 = keep)")
    crop: int = param(224, ge=0, help="centre crop (0 = none)")
    limit: int = param(0, ge=0, help="evaluate only the first N images (0 = all)")
    optional: bool = param(False, help="skip (with a log line) when the root does not exist")


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` section of params.yaml."""

    models: tuple[ModelSpec, ...] = param((ModelSpec("groupvit", "data/model"),),
                                          help="models evaluated side by side on every data set")
    segmentation: tuple[SegmentationSpec, ...] = param((), help="zero-shot segmentation data sets, in order")
    classification: tuple[ClassificationSpec, ...] = param((), help="zero-shot classification data sets (top-1/top-5)")
    templates: str = param("a photo of a {}.", help="segmentation prompt template, or a template file/resource")
    top_k: int = param(5, ge=0, help="keep the top-k classes of the whole-image embedding (0 = all)")
    assignment: str = param("hard", choices=("hard", "soft"), help="hard: one group per pixel (reference)")
    precision: str = param("fp32", choices=("fp32", "bf16"), help="autocast of the image encoder")
    batch_size: int = param(32, ge=1, help="images per forward (whole mode, same-size images)")
    num_pictures: int = param(8, ge=0, help="pictures of the first N images of the report data set")
    report: str = param("", help="data set of the pictures, per-class table and comparison ('' = the last)")
    baseline: str = param("vit_pixelwise", help="model the others are compared with (ratio of mIoU)")
    output_dir: str = param("data/eval", help="pictures, tables and thresholds of the run (the DVC output)")
    metrics_file: str = param("metrics/evaluate.json", help="every figure of the run (the DVC metrics file)")
    per_class_file: str = param("metrics/per_class_iou.csv", help="per-class IoU of the report data set (DVC plot)")
    threads: int = param(0, ge=0, help="torch CPU threads (0 = torch default)")


def skipped(spec: SegmentationSpec | ClassificationSpec) -> bool:
    """An optional data set whose root is absent: skipped (with a log line by the caller)."""
    return spec.optional and not Path(spec.root).exists()


def check_config(cfg: EvaluateConfig) -> None:
    """Fail before any work on what would otherwise stop the run after earlier data sets were evaluated: names that
    refer to no data set evaluated before them, absent data sets, split files or class lists, unreadable templates.

    Raises:
        ConfigError: a duplicated data set name, `bg_thresh_from` or `report` naming no suitable data set.
        DataError, FileNotFoundError: a non-optional data set root or a template file is missing.
    """
    # imported here so that reading the config (params docs, `--help`) does not load torch and PIL
    from groupvit.evaluation.classification import templates_of
    from groupvit.evaluation.datasets import ImageFolderDataset, SegmentationDataset

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
        if not skipped(spec):
            evaluated[spec.name] = spec
    if cfg.report and cfg.report not in evaluated:
        absent = " (optional, its root is absent)" if cfg.report in names else ""
        raise ConfigError(f"evaluate.report: {cfg.report!r} is not an evaluated segmentation data set{absent} "
                          f"({', '.join(evaluated) or 'none'})")
    for spec in evaluated.values():  # split files, class lists: cheap to read, fatal to find missing later
        SegmentationDataset(spec.root, spec.layout, spec.split, spec.classes or None)
    templates_of(cfg.templates, "evaluate.templates")
    for cspec in cfg.classification:
        templates_of(cspec.templates, f"evaluate.classification.{cspec.name}.templates")
        if not skipped(cspec) and cspec.layout == "folder":
            ImageFolderDataset(cspec.root)
        elif not skipped(cspec):  # the single-object filter reads every mask: only the split is checked here
            SegmentationDataset(cspec.root, "voc", cspec.split)
