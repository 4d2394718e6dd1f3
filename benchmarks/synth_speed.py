"""Generation speed of the synthetic world (images/s), split into its parts and by worker count.

Rows, each at every requested image size:
In-memory rows report images per CPU-second of this process (robust to other work on a shared machine); writer
rows report wall-clock images/s and images per CPU-second of the parent and its worker processes together.

- `scene`:          background + objects + label map, in memory (one process)
- `scene+caption`:  plus the caption
- `+jpeg`:          plus JPEG encoding (what a training image costs, without the file write)
- `write_world wN`: the whole writer (files, url list, VOC masks) with N worker processes, CPU-seconds included

    .venv/bin/python benchmarks/synth_speed.py [--sizes 64 96] [--n 2000] [--workers 1 2] [--quick]

Figures: benchmarks/results/synth_speed.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from _results import Run, parse_args

from groupvit.synth import CaptionStyle, WorldSpec, make_caption, make_scene
from groupvit.synth.writer import encode_jpeg, scene_rngs, write_world


def cpu_seconds() -> float:
    """CPU time of this process and of its waited-for children (the writer's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rate(fn, n: int) -> float:
    fn(0)  # warm-up
    start = time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.process_time() - start)


QUICK = {"sizes": [64], "n": 100, "write_n": 200, "workers": [1], "voc_n": 50}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--n", type=int, default=2000, help="images per in-memory row")
    p.add_argument("--write-n", type=int, default=6000, help="training images per write_world row")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--voc-n", type=int, default=500, help="images of the VOC-layout row (JPEG + palette PNG mask)")
    args = parse_args(p, QUICK)
    run = Run("synth_speed", args)
    rows: list[dict] = []
    style = CaptionStyle()
    print(f"{'size':>4}  {'variant':<16} {'img/CPU-s':>9} {'img/s wall':>10}")
    for size in args.sizes:
        spec = WorldSpec(image_size=size)

        def scene(i: int, spec: WorldSpec = spec) -> None:
            make_scene(spec, scene_rngs(0, "train", i)[0])

        def captioned(i: int, spec: WorldSpec = spec) -> None:
            a, b = scene_rngs(0, "train", i)
            make_caption(make_scene(spec, a), spec, style, b)

        def jpeg(i: int, spec: WorldSpec = spec) -> None:
            a, b = scene_rngs(0, "train", i)
            s = make_scene(spec, a)
            make_caption(s, spec, style, b)
            encode_jpeg(s.image, 90)

        for name, fn in (("scene", scene), ("scene+caption", captioned), ("+jpeg", jpeg)):
            per_cpu = rate(fn, args.n)
            rows.append({"size": size, "variant": name, "images_per_cpu_s": per_cpu})
            print(f"{size:>4}  {name:<16} {per_cpu:>9.0f}", flush=True)
        for workers in args.workers:
            out = Path(tempfile.mkdtemp(prefix="synth-speed-"))
            try:
                counts = {"train": args.write_n, "val": 0, "test": 0}
                start_cpu = cpu_seconds()
                summary = write_world(out, spec, style, seed=0, counts=counts, url_base="http://127.0.0.1:18765",
                                      workers=workers)
                cpu = cpu_seconds() - start_cpu
            finally:
                shutil.rmtree(out, ignore_errors=True)
            rows.append({"size": size, "variant": f"write_world w{workers}", "images_per_cpu_s": args.write_n / cpu,
                         "images_per_s": summary["images_per_second"]})
            print(f"{size:>4}  {'write_world w' + str(workers):<16} {args.write_n / cpu:>9.0f} "
                  f"{summary['images_per_second']:>10.0f}", flush=True)
    masks = {"train": 0, "val": args.voc_n, "test": 0}
    out = Path(tempfile.mkdtemp(prefix="synth-speed-"))
    try:
        start_cpu = cpu_seconds()
        summary = write_world(out, WorldSpec(image_size=64), style, seed=0, counts=masks,
                              url_base="http://127.0.0.1:18765", workers=1)
        cpu = cpu_seconds() - start_cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows.append({"size": 64, "variant": "VOC split w1", "images_per_cpu_s": args.voc_n / cpu,
                 "images_per_s": summary["images_per_second"]})
    print(f"  64  {'VOC split w1':<16} {args.voc_n / cpu:>9.0f} {summary['images_per_second']:>10.0f}"
          "   (JPEG + palette PNG mask per image)")
    run.write(rows)


if __name__ == "__main__":
    main()
