"""Zero-shot segmentation speed (images/s through the whole evaluation loop: decode, forward, maps, metrics).

Variants run side by side in one process, so ratios are meaningful on a shared machine:
- tiny GroupViT vs the pixel-wise ViT baseline, on 64 px synthetic images in whole mode (batched);
- hard (reference) vs soft assignment maps, fp32 vs bf16 autocast, batch 1 vs 32, short side 64 vs 128;
- the released GroupViT-S architecture (random weights) at the reference setting: short side 448, sliding window 448
  / stride 224, on 500 x 375 images (PASCAL VOC size).

    .venv/bin/python benchmarks/eval_throughput.py [--images 96] [--voc-images 4] [--threads 2] [--quick]

Figures: benchmarks/results/eval_throughput.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _results import Run, parse_args
from PIL import Image

from groupvit.evaluation.datasets import SegmentationDataset
from groupvit.evaluation.runner import evaluate_segmentation
from groupvit.evaluation.segmentation import SegmentationSettings, Segmenter
from groupvit.model import IMAGENET_MEAN, IMAGENET_STD, GroupViT, ModelConfig
from groupvit.synth import CaptionStyle, WorldSpec, write_world


def make_voc_like(root: Path, n: int, size=(375, 500)) -> Path:
    """n random 500 x 375 images with masks in VOC layout (speed only: content does not matter)."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"JPEGImages/{i:04d}.jpg")
        Image.fromarray(rng.integers(0, 21, size, dtype=np.uint8), mode="L").save(
            root / f"SegmentationClass/{i:04d}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i:04d}\n" for i in range(n)))
    return root


def run(name: str, model: GroupViT, ds: SegmentationDataset, settings: SegmentationSettings, batch: int,
        bf16: bool = False) -> float:
    text = torch.nn.functional.normalize(torch.randn(ds.num_classes - 1, model.cfg.output_dim), dim=-1)

    @torch.no_grad()
    def encode(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.segmentation_outputs(x)
        return {"image": out["image"].float(), "groups": out["groups"].float(),
                "soft_maps": [a.float() for a in out["soft_maps"]], "grid": out["grid"]}

    seg = Segmenter(encode, text, 10.0, settings, IMAGENET_MEAN, IMAGENET_STD)
    evaluate_segmentation(seg, ds, [0.9], batch, limit=min(len(ds), batch), oracle=False)  # warm-up
    r = evaluate_segmentation(seg, ds, [0.9], batch, oracle=settings.mode == "whole")
    rate = r.num_images / r.seconds
    print(f"{name:<58} {rate:9.1f} images/s  ({r.num_images} images, {r.seconds:.1f} s)", flush=True)
    return rate


QUICK = {"images": 32, "voc_images": 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96, help="synthetic 64 px images")
    p.add_argument("--voc-images", type=int, default=4, help="500 x 375 images for the reference setting")
    p.add_argument("--threads", type=int, default=2)
    args = parse_args(p, QUICK)
    record = Run("eval_throughput", args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="eval_bench_"))
    write_world(tmp / "synth", WorldSpec(image_size=64), CaptionStyle(), seed=0,
                counts={"train": 1, "val": args.images, "test": 1}, url_base="http://127.0.0.1:1")
    synth = SegmentationDataset(tmp / "synth/val", "voc")
    tiny = GroupViT(ModelConfig(preset="tiny")).eval()
    pixel = GroupViT(ModelConfig(preset="tiny", depths=(5,), num_heads=(4,), num_group_tokens=(0,),
                                 num_output_groups=())).eval()
    whole = SegmentationSettings(mode="whole", short_side=64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = run("tiny GroupViT, whole 64 px, batch 32, hard, fp32", tiny, synth, whole, 32)
    rates = {
        "pixel-wise ViT baseline": run("pixel-wise ViT, whole 64 px, batch 32, fp32", pixel, synth, whole, 32),
        "soft maps": run("tiny GroupViT, soft maps", tiny, synth,
                         SegmentationSettings(mode="whole", short_side=64, hard=False), 32),
        "bf16": run("tiny GroupViT, bf16 autocast", tiny, synth, whole, 32, bf16=True),
        "batch 1": run("tiny GroupViT, batch 1", tiny, synth, whole, 1),
        "short side 128": run("tiny GroupViT, whole 128 px (2x upscale)", tiny, synth,
                              SegmentationSettings(mode="whole", short_side=128), 32),
    }
    rows = [{"variant": "tiny GroupViT, whole 64 px, batch 32, hard maps, fp32 (default)", "images_per_s": base,
             "vs_default": 1.0}]
    for k, v in rates.items():
        print(f"  {k:<30} {v / base:5.2f}x the tiny GroupViT default")
        rows.append({"variant": k, "images_per_s": v, "vs_default": v / base})
    if args.voc_images:
        voc = SegmentationDataset(make_voc_like(tmp / "voc", args.voc_images), "voc")
        released = GroupViT(ModelConfig(preset="gcc_yfcc")).eval()
        for name, bf16 in (("GroupViT-S (released arch.), slide 448/224, 500x375, fp32", False),
                           ("GroupViT-S (released arch.), slide 448/224, bf16", True)):
            rows.append({"variant": name, "images_per_s": run(name, released, voc, SegmentationSettings(), 1,
                                                              bf16=bf16)})
    record.write(rows)


if __name__ == "__main__":
    main()
