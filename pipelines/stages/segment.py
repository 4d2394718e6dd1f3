"""`groupvit segment IMAGE --classes "cat,dog,sky"`: zero-shot segmentation of any image with any class list.

Writes the evaluation picture (image, prediction with a class legend, the groups of each stage) to `--out`. Prompt
templates, top-k and the assignment mode come from the `evaluate` section of params.yaml; whole-image mode as the
reference demo. Not a DVC stage.
"""
from __future__ import annotations

import logging
from pathlib import Path

from groupvit.errors import DataError
from pipelines.common import load, run_stage, stage_parser

log = logging.getLogger("groupvit.segment")


def parse_classes(value: str) -> list[str]:
    names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise DataError(f"--classes {value!r}: expected a comma-separated list of class names, e.g. 'cat,dog,sky'")
    if "background" in names:
        raise DataError("--classes: 'background' is implicit (pixels under --bg-thresh), do not list it")
    return names


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("segment", "zero-shot segmentation of one image with any class list")
    p.add_argument("image", help="image file (jpg, png, ...)")
    p.add_argument("--classes", required=True, help="comma-separated class names, e.g. 'cat,dog,sky'")
    p.add_argument("--model", default="data/model", help="model folder (default: data/model)")
    p.add_argument("--out", default=None, help="output PNG (default: <image stem>_segmentation.png)")
    p.add_argument("--bg-thresh", type=float, default=0.95, help="background threshold (default 0.95, as VOC)")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize the short side first (default: 2x the model's training size, as 448 for 224)")
    args = p.parse_args(argv)

    def body() -> int:
        from groupvit.evaluation.datasets import read_image
        from groupvit.evaluation.segmentation import Segmenter, SegmentationSettings, stage_group_maps
        from groupvit.evaluation.visualize import segmentation_figure, write_png
        from groupvit.model import IMAGENET_MEAN, IMAGENET_STD
        from pipelines.stages.evaluate import EvaluateConfig, LoadedModel, ModelSpec, templates_of

        cfg = load(EvaluateConfig, args, "evaluate")
        names = parse_classes(args.classes)
        if not 0.0 <= args.bg_thresh <= 1.0:
            raise DataError(f"--bg-thresh {args.bg_thresh}: expected a value in [0, 1]")
        image = read_image(Path(args.image))
        if not Path(args.model).exists():
            raise DataError(f"--model {args.model}: model folder not found (train one with `dvc repro train`)")
        model = LoadedModel(ModelSpec("model", args.model), cfg.precision)
        short = args.short_side if args.short_side is not None else 2 * model.model.cfg.image_size
        settings = SegmentationSettings("whole", short, 10 ** 6, 1, 1, cfg.top_k, cfg.assignment == "hard")
        text = model.text_embeddings(names, templates_of(cfg.templates))
        seg = Segmenter(model.segmentation_outputs, text, model.logit_scale, settings, IMAGENET_MEAN, IMAGENET_STD)
        pred = seg.predict(image[None], args.bg_thresh)[0]
        png = segmentation_figure(image, pred, ["background", *names], None, stage_group_maps(seg, image),
                                  title=f"{Path(args.image).name}: {', '.join(names)}")
        out = Path(args.out) if args.out else Path(f"{Path(args.image).stem}_segmentation.png")
        write_png(out, png)
        present = [(["background", *names][c], float((pred == c).float().mean())) for c in pred.unique().tolist()]
        print(f"{out}: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in present))
        return 0

    return run_stage(body)
