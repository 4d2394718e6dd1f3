"""Response time of the demo page (`groupvit demo`): from submit to result through the page's API, on --threads cores.

Each case serves the real page (`pipelines.demo_app`) on a loopback port and submits with Gradio's API client, so
a time covers the upload, the queue, decoding, `segment_image`, the pictures and their download:
- embedded: the model `make repro` trains (data/model: the tiny preset at 64 px; random weights of params.yaml's
  `model` section when data/model is missing) on a 64 px held-out synthetic scene with the world's 10 classes (the
  model sees a 128 px short side);
- gcc_yfcc: the released GroupViT-S architecture (random weights: the time does not depend on them) on a 500 x 375
  image (PASCAL VOC size) with the 20 VOC classes, at the 448 px short side of the reference demo.

`first` is the first submit of a class list (the text encoder runs); `repeat` the median of --repeats submits of the
same image and classes at other thresholds (the class embeddings are cached, as when a person tunes the threshold).

    .venv/bin/python benchmarks/demo_latency.py [--threads 2] [--repeats 5] [--quick]

Figures: benchmarks/results/demo_latency.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _results import ROOT, Run, parse_args
from PIL import Image

from groupvit.checkpoint import save_pretrained
from groupvit.config import load_section
from groupvit.evaluation.config import EvaluateConfig
from groupvit.model import GroupViT, ModelConfig
from groupvit.synth.config import SynthConfig
from pipelines.demo_app import build_app, launch, load_demo
from pipelines.demo_browser import free_port
from pipelines.demo_examples import examples_dir


def timed_submits(demo, image: Path, repeats: int) -> dict:
    """Serve the page for `demo`, submit `image` with its default classes once, then `repeats` more times."""
    from gradio_client import Client, handle_file

    app, port = build_app(demo), free_port()
    launch(app, "127.0.0.1", port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        classes = ", ".join(demo.classes)

        def submit(thr: float) -> float:
            start = time.perf_counter()
            *_, status = client.predict(handle_file(str(image)), classes, thr, demo.cfg.top_k, api_name="/segment")
            seconds = time.perf_counter() - start
            if not status.startswith("Segmented"):
                raise RuntimeError(f"the page answered {status!r}")
            return seconds

        first = submit(demo.bg_thresh)
        again = [submit(round(0.5 + 0.05 * i, 2)) for i in range(repeats)]
    finally:
        app.close(verbose=False)
    return {"first_s": first, "repeat_median_s": statistics.median(again), "repeat_min_s": min(again),
            "repeat_max_s": max(again), "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--model", default=str(ROOT / "data" / "model"), help="the embedded model (default data/model)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the machine's 2 cores)")
    p.add_argument("--repeats", type=int, default=5)
    args = parse_args(p, quick={"repeats": 1})
    run = Run("demo_latency", args)
    torch.set_num_threads(args.threads)
    cfg = load_section(EvaluateConfig, args.params, "evaluate")
    synth = load_section(SynthConfig, args.params, "synth", required=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="groupvit-demo-bench-") as tmp:
        tmp_dir = Path(tmp)
        embedded, weights = Path(args.model), "trained (data/model)"
        if not (embedded / "config.json").is_file():
            torch.manual_seed(0)
            save_pretrained(GroupViT(load_section(ModelConfig, args.params, "model")), tmp_dir / "embedded")
            embedded, weights = tmp_dir / "embedded", "random (no data/model)"
        scene = examples_dir() / "test_000000.png"
        voc = tmp_dir / "voc_size.jpg"  # 500 x 375, the PASCAL VOC size; the content does not change the time
        Image.open(scene).resize((500, 375), Image.Resampling.BILINEAR).save(voc, quality=95)
        torch.manual_seed(0)
        save_pretrained(GroupViT(ModelConfig(preset="gcc_yfcc")), tmp_dir / "gcc_yfcc")
        for case, model, image, size in (("embedded", embedded, scene, "64 x 64"),
                                         ("gcc_yfcc", tmp_dir / "gcc_yfcc", voc, "500 x 375")):
            demo = load_demo(model, cfg, synth)
            c = demo.model.model.cfg
            row = {"case": case, "architecture": f"{c.preset}: {c.image_size} px, patch {c.patch_size}, groups "
                   f"{list(c.num_output_groups)}", "weights": weights if case == "embedded" else "random",
                   "image": size, "short_side": 2 * c.image_size, "classes": len(demo.classes),
                   **timed_submits(demo, image, args.repeats)}
            print(f"{case:<9} {row['architecture']:<44} {size} px -> short side {row['short_side']}, "
                  f"{row['classes']} classes: first {row['first_s']:.2f} s, repeat {row['repeat_median_s']:.2f} s "
                  f"(min {row['repeat_min_s']:.2f}, max {row['repeat_max_s']:.2f})", flush=True)
            rows.append(row)
            del demo
    versions = {p: importlib.metadata.version(p) for p in ("gradio", "gradio_client", "torch", "pillow")}
    run.write(rows, {"threads": args.threads, **{f"{r['case']}_repeat_s": r["repeat_median_s"] for r in rows}},
              versions=versions)


if __name__ == "__main__":
    main()
