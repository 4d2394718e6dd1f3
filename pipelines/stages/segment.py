"""`groupvit segment IMAGE --classes "cat,dog,sky"`: zero-shot segmentation of any image with any class list.

Writes the evaluation picture (image, prediction with a class legend, the groups of each stage) to `--out`. Prompt
templates, top-k and the assignment mode come from the `evaluate` section of params.yaml; whole-image mode as the
reference demo. The background threshold defaults to the one the evaluate stage tuned for these weights
(`<evaluate.output_dir>/thresholds.json`, matched by the weights' digest: `groupvit.evaluation.thresholds`), else
0.95 (VOC). The work is `groupvit.evaluation.inference.segment_image`, the code path `groupvit evaluate` uses too.
Not a DVC stage.

Image size: after the short-side resize the image the model sees is capped at 4096 px on its long side and
2048 x 2048 px in all (scaled down, keeping the ratio); an image more elongated than 64:1 is refused before the model
is loaded (`groupvit.evaluation.limits.inference_size`, shared with `groupvit evaluate`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from groupvit.errors import DataError
from groupvit.evaluation.limits import MAX_ASPECT_RATIO, MAX_LONG_SIDE, MAX_PIXELS, inference_size
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
    p.add_argument("--bg-thresh", type=float, default=None,
                   help="background threshold (default: the one `groupvit evaluate` tuned for these weights,"
                        " else 0.95)")
    p.add_argument("--short-side", type=int, default=None,
                   help="resize the short side first (default: 2x the model's training size, as 448 for 224); the "
                        f"resized image is capped at {MAX_LONG_SIDE} px on its long side and {MAX_PIXELS:,} px in "
                        f"all (scaled down), and images more elongated than {MAX_ASPECT_RATIO}:1 are refused")
    args = p.parse_args(argv)

    def body() -> int:
        from groupvit.atomic import atomic_write
        from groupvit.evaluation.config import EvaluateConfig, ModelSpec
        from groupvit.evaluation.datasets import read_image
        from groupvit.evaluation.inference import LoadedModel, segment_image
        from groupvit.evaluation.thresholds import tuned_threshold

        cfg = load(EvaluateConfig, args, "evaluate")
        names = parse_classes(args.classes)
        bg_thresh = args.bg_thresh
        if bg_thresh is not None and not 0.0 <= bg_thresh <= 1.0:
            raise DataError(f"--bg-thresh {bg_thresh}: expected a value in [0, 1]")
        image = read_image(Path(args.image))
        inference_size(*image.shape[-2:], 0, MAX_LONG_SIDE, args.image)  # refuse an elongated image before any work
        if not Path(args.model).exists():
            raise DataError(f"--model {args.model}: model folder not found (train one with `dvc repro train`)")
        model = LoadedModel(ModelSpec("model", args.model), cfg.precision)
        if bg_thresh is None:
            tuned = tuned_threshold(cfg.output_dir, model.digest)
            bg_thresh = tuned[0] if tuned else 0.95
            log.info("background threshold %s (%s)", bg_thresh,
                     f"tuned on {tuned[1]} by groupvit evaluate" if tuned else "VOC default; none tuned for this model")
        result = segment_image(model, image, names, cfg, bg_thresh, args.short_side,
                               title=f"{Path(args.image).name}: {', '.join(names)}")
        out = atomic_write(args.out or f"{Path(args.image).stem}_segmentation.png", result.picture)
        print(f"{out}: " + ", ".join(f"{n} {100 * f:.1f}%" for n, f in result.fractions()) +
              f" (bg_thresh {bg_thresh:g})")
        return 0

    return run_stage(body)
