"""Write the synthetic world to disk: a captioned training split and two segmentation splits in PASCAL VOC layout.

    <out>/train/images/<key>.jpg         training images (JPEG)
    <out>/train/urls.parquet             url, caption, key: a CC3M/CC12M-style url list for img2dataset
    <out>/train/labels.parquet           key, categories (names in view): for probes and diagnostics, never training
    <out>/{val,test}/JPEGImages/<id>.jpg
    <out>/{val,test}/SegmentationClass/<id>.png    palette PNG, class index per pixel, 255 = ignore (borders)
    <out>/{val,test}/ImageSets/Segmentation/val.txt
    <out>/{val,test}/class_names.txt    background first, then the category names (the zero-shot prompt words)

Every image is generated from its own seed `(seed, split, index)`, so the bytes do not depend on the number of
worker processes or on the order in which chunks finish, and growing a split keeps its existing images.
"""
from __future__ import annotations

import io
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from groupvit.evaluation.palette import voc_palette
from groupvit.synth.captions import CaptionStyle, make_caption
from groupvit.synth.scene import Scene, WorldSpec, ignore_borders, make_scene

SPLITS = {"train": 0, "val": 1, "test": 2}  # split code in the per-image seed
CHUNK = 256  # images per task handed to a worker


def scene_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (scene, caption) random streams for one image, fixed by (seed, split, index) alone."""
    scene_seq, caption_seq = np.random.SeedSequence([seed, SPLITS[split], index]).spawn(2)
    return np.random.default_rng(scene_seq), np.random.default_rng(caption_seq)


def generate(spec: WorldSpec, style: CaptionStyle, seed: int, split: str, index: int) -> tuple[Scene, str]:
    """Scene and caption number `index` of `split`."""
    scene_rng, caption_rng = scene_rngs(seed, split, index)
    scene = make_scene(spec, scene_rng)
    return scene, make_caption(scene, spec, style, caption_rng)


_PALETTE = voc_palette().ravel().tolist()  # 768 ints (R, G, B of index 0, 1, ...), as PIL takes it


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes with every encoder option fixed (4:4:4, baseline, no EXIF), so equal pixels give equal bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """A lossless palette PNG of class indices (uint8 [H, W]) with the VOC colour map."""
    im = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    im.putpalette(_PALETTE)
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def train_key(index: int) -> str:
    return f"{index:08d}"


def eval_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


@dataclass(frozen=True)
class Job:
    """One chunk of one split, everything a worker process needs (picklable)."""
    spec: WorldSpec
    style: CaptionStyle
    seed: int
    split: str
    start: int
    stop: int
    root: str  # the split folder
    quality: int
    ignore_border: int


def _run(job: Job) -> list[tuple[str, str, list[str], int]]:
    """Generate and write images [start, stop) of a split; return (key, caption, categories, objects) per image."""
    root = Path(job.root)
    rows = []
    for index in range(job.start, job.stop):
        scene, caption = generate(job.spec, job.style, job.seed, job.split, index)
        names = [job.spec.categories[c - 1] for c in scene.class_indices()]
        if job.split == "train":
            key = train_key(index)
            (root / "images" / f"{key}.jpg").write_bytes(encode_jpeg(scene.image, job.quality))
        else:
            key = eval_id(job.split, index)
            (root / "JPEGImages" / f"{key}.jpg").write_bytes(encode_jpeg(scene.image, job.quality))
            mask = ignore_borders(scene.label, job.ignore_border)
            (root / "SegmentationClass" / f"{key}.png").write_bytes(encode_mask(mask))
        rows.append((key, caption, names, len(scene.objects)))
    return rows


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd", write_statistics=False)


def write_world(out: Path, spec: WorldSpec, style: CaptionStyle, *, seed: int, counts: dict[str, int],
                url_base: str, quality: int = 90, ignore_border: int = 1, workers: int = 1) -> dict:
    """Write every split of the world into the (new or empty) folder `out`; return a summary for logs and metrics.

    Args:
        out: destination folder (use `groupvit.atomic.atomic_dir` to write it all-or-nothing).
        spec: image parameters; style: caption parameters.
        seed: the world's seed; counts: images per split (`train`, `val`, `test`).
        url_base: `http://127.0.0.1:PORT`; the url of a training image is `{url_base}/<key>.jpg`.
        quality: JPEG quality; ignore_border: width of the 255 band on object borders in the masks.
        workers: processes (1 = in this process); the bytes written do not depend on it.
    """
    start = time.perf_counter()
    (out / "train" / "images").mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
    jobs = [Job(spec, style, seed, split, i, min(i + CHUNK, counts[split]), str(out / split), quality, ignore_border)
            for split in SPLITS for i in range(0, counts[split], CHUNK)]
    rows: dict[str, list] = {split: [] for split in SPLITS}
    if workers <= 1:
        results: Iterator = map(_run, jobs)
        for job, result in zip(jobs, results, strict=True):
            rows[job.split] += result
    else:
        # spawn: children start clean whatever the parent imported (torch threads, open files).
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for job, result in zip(jobs, pool.imap(_run, jobs), strict=True):
                rows[job.split] += result

    train = rows["train"]
    keys = [r[0] for r in train]
    _write_parquet(pa.table({"url": [f"{url_base}/{k}.jpg" for k in keys], "caption": [r[1] for r in train],
                             "key": keys}), out / "train" / "urls.parquet")
    _write_parquet(pa.table({"key": keys, "categories": pa.array([r[2] for r in train], pa.list_(pa.string()))}),
                   out / "train" / "labels.parquet")
    class_names = "\n".join(["background", *spec.categories]) + "\n"
    for split in ("val", "test"):
        (out / split / "class_names.txt").write_text(class_names)
        ids = "".join(f"{r[0]}\n" for r in rows[split])
        (out / split / "ImageSets" / "Segmentation" / "val.txt").write_text(ids)

    seconds = time.perf_counter() - start
    total = sum(counts.values())
    frequency = Counter(name for split in SPLITS for r in rows[split] for name in r[2])
    all_rows = [r for split in SPLITS for r in rows[split]]
    return {
        "images": dict(counts),
        "seconds": round(seconds, 3),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
        "objects_per_image": round(float(np.mean([r[3] for r in all_rows])), 3) if all_rows else 0.0,
        "categories_per_image": round(float(np.mean([len(r[2]) for r in all_rows])), 3) if all_rows else 0.0,
        "category_frequency": {name: frequency[name] for name in spec.categories},
    }

