"""Images/s per loader worker of `make_train_loader`, for the augmentation and prompt variants, side by side.

    .venv/bin/python benchmarks/loader_throughput.py [--shards data/shards --nouns data/nouns] [--size 64]
        [--source-size 64] [--images 1500] [--batch 64] [--rounds 3] [--quick]

Without `--shards`, it writes temporary shards of random-texture JPEGs at `--source-size` (64 = the embedded world;
try 256 for CC3M-like shards, whose images img2dataset stores at up to 512 px) with captions of ~10 words and three
nouns each. Each variant runs the whole pipeline (tar read, decode, augmentation, prompts, BPE tokenisation of 1+K
texts, collation) in this process (`num_workers=0`), so its rate is what one loader worker delivers; a training rank
with W workers gets about W times that while cores last. Compare with what training consumes (printed by the train
stage; e.g. ≈700 img/s for the tiny model on 2 CPU cores, ≈311 img/s per V100 for the reference GroupViT-S).
Figures: benchmarks/results/loader_throughput.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from _results import Run, parse_args
from PIL import Image

from groupvit.data.config import DataConfig
from groupvit.data.loader import make_train_loader
from groupvit.data.nouns import write_sidecar


def write_shards(root: Path, n: int, size: int, per_shard: int = 500) -> tuple[Path, Path]:
    shards, nouns = root / "shards", root / "nouns"
    shards.mkdir()
    nouns.mkdir()
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)
    for s in range((n + per_shard - 1) // per_shard):
        words = {}
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as tw:
            for i in range(min(per_shard, n - s * per_shard)):
                key = f"{s:05d}{i:04d}"
                img = np.roll(base, int(rng.integers(size)), axis=1) // 2 + rng.integers(0, 128, 3, dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, "JPEG", quality=90)
                caption = f"a small brown dog {i} plays with a red ball on the green grass of the park"
                tw.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption, "json": b"{}"})
                words[key] = ["dog", "plays", "ball", "grass", "park"]
        write_sidecar(nouns / f"{s:05d}.json", words)
    return shards, nouns


def rate(shards: Path, nouns: Path, cfg: DataConfig, batch: int, images: int, workers: int = 0) -> tuple[float, float]:
    """(images per wall-second, images per CPU-second of this process; meaningful with workers=0)."""
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": workers})
    loader, _, _ = make_train_loader(shards, nouns, cfg, batch_size=batch, rank=0, world_size=1, seed=0)
    it = iter(loader)
    next(it)  # warm-up: worker start, first shard open, BPE cache
    start, cpu, seen = time.perf_counter(), time.process_time(), 0
    while seen < images:
        try:
            seen += next(it)[0].shape[0]
        except StopIteration:
            it = iter(loader)
    return seen / (time.perf_counter() - start), seen / max(time.process_time() - cpu, 1e-9)


QUICK = {"images": 128, "batch": 32, "rounds": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="")
    ap.add_argument("--nouns", default="")
    ap.add_argument("--size", type=int, default=64, help="training crop size")
    ap.add_argument("--source-size", type=int, default=64, help="stored image height of the generated shards")
    ap.add_argument("--images", type=int, default=1500, help="images timed per variant")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = parse_args(ap, QUICK)
    record = Run("loader_throughput", args)
    torch.set_num_threads(1)  # as in a DataLoader worker (num_workers=0 runs the pipeline in this process)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            shards, nouns = Path(args.shards), Path(args.nouns)
        else:
            shards, nouns = write_shards(Path(tmp), max(args.images * 2, 1000), args.source_size)
        base = DataConfig(image_size=args.size, shuffle_buffer=1000, crop_scale=(0.08, 1.0))
        variants = {
            "crop + flip, caption only (K=0)": DataConfig(**{**base.__dict__, "multi_label": 0}),
            "crop + flip, K=3 prompts": base,
            "reference: + RandAugment m9 + erasing 0.25, K=3": DataConfig(**{**base.__dict__, "rand_augment": True,
                                                                             "random_erasing": 0.25}),
        }
        print(f"shards {shards}, crop {args.size}, batch {args.batch}, {args.images} images per variant; best of "
              f"{args.rounds} interleaved rounds (a shared machine's load shifts between variants)")
        best = {name: (0.0, 0.0) for name in variants}
        for _ in range(args.rounds):
            for name, cfg in variants.items():
                wall, cpu = rate(shards, nouns, cfg, args.batch, args.images)
                best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
        first = next(iter(best.values()))[1]
        rows = []
        for name, (wall, cpu) in best.items():
            print(f"  {name:<52} {wall:7,.0f} img/s per worker, {cpu:7,.0f} per CPU-second  ({cpu / first:.2f}x)")
            rows.append({"variant": name, "images_per_s_per_worker": wall, "images_per_cpu_s": cpu,
                         "vs_first_per_cpu_s": cpu / first})
        wall, _ = rate(shards, nouns, base, args.batch, args.images * 2, workers=2)
        print(f"  {'K=3 prompts, 2 worker processes (whole loader)':<52} {wall:7,.0f} img/s")
        rows.append({"variant": "K=3 prompts, 2 worker processes (whole loader)", "images_per_s": wall})
    record.write(rows)


if __name__ == "__main__":
    main()
