"""`groupvit synth`: generate the embedded synthetic captioned-scene world (the pipeline's first stage).

DVC stage (for dvc.yaml):
    cmd:    groupvit synth
    deps:   groupvit/synth, groupvit/atomic.py, pipelines/stages/synth.py
    params: base.seed, synth (every key of the section)
    outs:   data/synth   (train/images/, train/urls.parquet, train/labels.parquet, val/, test/ in PASCAL VOC layout,
                          summary.json, resolved_config.yaml; the path is `synth.out_dir`)
    metrics: none (the counts and category frequencies are in data/synth/summary.json)

The output is byte-identical for the same params whatever `synth.workers` is, so `dvc repro` after a change that
does not touch the world reruns nothing downstream. The folder is replaced all-or-nothing: a failed run leaves the
previous world in place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from groupvit.atomic import atomic_dir
from groupvit.config import save_resolved
from groupvit.synth import write_world
from groupvit.synth.config import SynthConfig
from pipelines.common import load, load_base, run_stage, stage_parser


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("synth", "generate the embedded synthetic captioned-scene world")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load(SynthConfig, args, "synth")
        base = load_base(args)
        workers = cfg.workers or usable_cpus()
        counts = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}
        out = Path(cfg.out_dir)
        with atomic_dir(out) as tmp:
            summary = write_world(tmp, cfg.world_spec(), cfg.caption_style(), seed=base.seed, counts=counts,
                                  url_base=cfg.url_base, quality=cfg.jpeg_quality, ignore_border=cfg.ignore_border,
                                  workers=workers)
            timing = {k: summary.pop(k) for k in ("seconds", "images_per_second")}  # keep the folder deterministic
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            save_resolved(tmp / "resolved_config.yaml", base=base, synth=cfg)
        print(f"synth: wrote {out}: {counts['train']} training images ({cfg.image_size} px) with captions, "
              f"{counts['val']} validation and {counts['test']} held-out images with masks; "
              f"{summary['objects_per_image']:.2f} objects per image; "
              f"{timing['images_per_second']:.0f} images/s with {workers} worker(s) in {timing['seconds']:.1f} s")
        return 0

    return run_stage(body)


if __name__ == "__main__":
    raise SystemExit(main())
