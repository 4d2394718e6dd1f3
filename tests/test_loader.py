"""The training loader: shapes, prompts, skipped bad samples, clear errors, disjoint equal streams under torchrun."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from groupvit.data import augment
from groupvit.data import loader as loader_module
from groupvit.data.config import DataConfig
from groupvit.data.loader import make_train_loader
from groupvit.data.nouns import write_sidecar
from groupvit.errors import DataError
from groupvit.tokenizer import tokenize

ROOT = Path(__file__).resolve().parents[1]
N_SHARDS, PER_SHARD = 4, 8


def _jpeg(seed: int, size: int = 24) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size + 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def make_shards(root: Path, bad: dict[int, bytes] | None = None) -> tuple[Path, Path]:
    """4 shards x 8 samples, unique captions 'photo <n> of a cat'; `bad` replaces the image of sample n."""
    shards, nouns = root / "shards", root / "nouns"
    shards.mkdir()
    nouns.mkdir()
    for s in range(N_SHARDS):
        words = {}
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as tw:
            for i in range(PER_SHARD):
                n, key = s * PER_SHARD + i, f"{s:05d}{i:04d}"
                data = (bad or {}).get(n, _jpeg(n))
                tw.write({"__key__": key, "jpg": data, "txt": f"photo {n} of a cat", "json": b"{}"})
                words[key] = ["photo", "cat"] if n % 2 else []
        write_sidecar(nouns / f"{s:05d}.json", words)
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"successes": PER_SHARD}))
    return shards, nouns


CFG = DataConfig(image_size=16, multi_label=3, shuffle_buffer=0, num_workers=0, crop_scale=(0.5, 1.0))


def test_batches_shapes_and_prompts(tmp_path):
    shards, nouns = make_shards(tmp_path)
    loader, num_batches, num_samples = make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1,
                                                         seed=0, context_length=16)
    assert (num_batches, num_samples) == (8, 32)
    batches = list(loader)
    assert len(batches) == 8
    pixels, tokens = batches[0]
    assert pixels.shape == (4, 3, 16, 16) and pixels.dtype == torch.float32
    assert tokens.shape == (4, 4, 16) and tokens.dtype == torch.int64
    assert pixels.min() < -1.0 and pixels.max() > 1.0  # ImageNet-normalised, not [0, 1]
    captions = {tuple(tokenize(f"photo {n} of a cat", 16)[0].tolist()): n for n in range(32)}
    seen = []
    for _, tok in batches:
        for row in tok:
            n = captions[tuple(row[0].tolist())]
            seen.append(n)
            prompts = [tuple(r.tolist()) for r in row[1:]]
            if n % 2 == 0:  # no words: every prompt is the caption
                assert prompts == [tuple(row[0].tolist())] * 3
            else:  # two words: two prompts, one caption pad
                assert prompts.count(tuple(row[0].tolist())) == 1
    assert sorted(seen) == list(range(32))  # one epoch = every sample once (single rank)
    assert list(next(iter(loader))[1].shape) == [4, 4, 16]


def test_multi_label_off_gives_caption_only(tmp_path):
    shards, nouns = make_shards(tmp_path)
    cfg = DataConfig(image_size=16, multi_label=0, shuffle_buffer=4, num_workers=0)
    loader, _, _ = make_train_loader(shards, None, cfg, batch_size=8, rank=0, world_size=1, seed=0, context_length=8)
    assert next(iter(loader))[1].shape == (8, 1, 8)


def test_same_seed_same_stream_and_epochs_differ(tmp_path):
    shards, nouns = make_shards(tmp_path)
    cfg = DataConfig(image_size=16, multi_label=3, shuffle_buffer=6, num_workers=0)

    def epochs(seed):
        loader, _, _ = make_train_loader(shards, nouns, cfg, batch_size=4, rank=0, world_size=1, seed=seed,
                                         context_length=16)
        return [torch.cat([t[:, 0] for _, t in loader]) for _ in range(2)]

    a, b = epochs(0), epochs(0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])  # a new epoch is a new order
    assert not torch.equal(a[0], epochs(1)[0])


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    bad = {3: _jpeg(3)[:200], 9: b"definitely not an image", 20: b""}
    shards, nouns = make_shards(tmp_path, bad)
    loader_module._SKIPPED.clear()
    loader, num_batches, _ = make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1, seed=0,
                                               context_length=16)
    batches = list(loader)
    assert len(batches) == num_batches  # the endless stream fills the epoch anyway
    skipped = loader_module.skipped_samples()
    assert sum(skipped.values()) >= 3 and set(skipped) <= {"OSError", "UnidentifiedImageError", "ValueError"}


class DeadlinePassed(BaseException):
    """Not an Exception: the loader's skip handlers must not swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds`: a generous safety bound."""
    def expire(*_):
        raise DeadlinePassed(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("workers", [0, 1])
def test_all_corrupt_shards_end_with_a_data_error_naming_them(tmp_path, workers):
    # the shard stream is endless: without a bound this loops forever, skipping
    shards, nouns = make_shards(tmp_path, {n: b"not an image" for n in range(N_SHARDS * PER_SHARD)})
    cfg = DataConfig(image_size=16, multi_label=3, shuffle_buffer=4, num_workers=workers)
    loader, _, _ = make_train_loader(shards, nouns, cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                     context_length=16)
    t0 = time.monotonic()
    with deadline(60), pytest.raises(DataError) as e:
        list(loader)
    assert time.monotonic() - t0 < 60
    msg = str(e.value)
    assert f"the last {loader_module.MAX_CONSECUTIVE_SKIPS} samples read in a row could not be used" in msg
    assert str(shards / "0000") in msg and ".tar (" in msg  # the shards, with their skip counts
    assert "e.g. sample '0000" in msg and "UnidentifiedImageError" in msg  # an example key and the reason
    assert "groupvit download" in msg  # what to do


def test_mostly_corrupt_data_ends_with_a_data_error(tmp_path):
    # 3 of every 4 images corrupt: never many in a row, but most of what is read is skipped
    shards, nouns = make_shards(tmp_path, {n: b"not an image" for n in range(N_SHARDS * PER_SHARD) if n % 4})
    loader, _, _ = make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1, seed=0,
                                     context_length=16)
    with deadline(60), pytest.raises(DataError, match=f"of the last {loader_module.SKIP_WINDOW} samples read could "
                                                      f"not be used .*shards/0000"):
        for _ in range(100):  # one epoch reads 4 passes of 32: the window of 1000 fills in the 8th epoch
            list(loader)


def test_skips_are_counted_across_worker_processes_and_logged_with_shard_and_key(tmp_path, caplog):
    bad = {3: _jpeg(3)[:200], 9: b"definitely not an image", 20: b""}
    shards, nouns = make_shards(tmp_path, bad)
    cfg = DataConfig(image_size=16, multi_label=3, shuffle_buffer=0, num_workers=2)
    counter = loader_module.shared_skip_counter()
    loader, num_batches, _ = make_train_loader(shards, nouns, cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                               context_length=16, skip_counter=counter)
    assert len(list(loader)) == num_batches
    assert counter.value >= 3  # counted in the two worker processes, read here

    with caplog.at_level(logging.WARNING, logger="groupvit.data.loader"):  # in-process: the log is visible here
        inline, _, _ = make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1, seed=0,
                                         context_length=16)
        list(inline)
    assert f"sample '000000003' of {shards / '00000.tar'}" in caplog.text
    assert f"sample '000010001' of {shards / '00001.tar'}" in caplog.text


def test_missing_sidecar_or_entry_fails_naming_it(tmp_path):
    shards, nouns = make_shards(tmp_path)
    (nouns / "00002.json").unlink()
    with pytest.raises(DataError, match="00002.json: noun sidecar missing"):
        make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1, seed=0)
    write_sidecar(nouns / "00002.json", {"000020000": []})  # stale: other keys missing
    loader, _, _ = make_train_loader(shards, nouns, CFG, batch_size=1, rank=0, world_size=1, seed=0)
    with pytest.raises(DataError, match="00002.json: no entry for sample"):
        list(loader)


def test_missing_shard_and_too_few_samples(tmp_path):
    shards, nouns = make_shards(tmp_path)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_train_loader(shards, nouns, CFG, batch_size=32, rank=0, world_size=2, seed=0)
    (shards / "00001.tar").unlink()
    with pytest.raises(DataError, match="00001.tar: shard missing"):
        make_train_loader(shards, nouns, CFG, batch_size=4, rank=0, world_size=1, seed=0)


def test_augmentations():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    crop = augment.random_resized_crop(img, 16, np.random.default_rng(1))
    assert crop.size == (16, 16)
    same = augment.random_resized_crop(img, 16, np.random.default_rng(1))
    assert np.array_equal(np.asarray(crop), np.asarray(same))
    whole = augment.random_resized_crop(img, 40, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.5, 1.5))
    assert np.abs(np.asarray(whole, dtype=float) - np.asarray(img.resize((40, 40), Image.BILINEAR))).mean() < 1
    for name, op in augment.RAND_AUGMENT_OPS.items():  # every op at both ends of the magnitude range
        for level in (0.0, 10.0):
            out = op(img, level, np.random.default_rng(0))
            assert out.size == img.size and out.mode == "RGB", name
    changed = augment.rand_augment(img, np.random.default_rng(3), num_ops=2, magnitude=9)
    assert changed.size == img.size and not np.array_equal(np.asarray(changed), np.asarray(img))
    x = augment.to_normalised_tensor(img)
    plain = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255  # the textbook formula
    mean, std = torch.tensor(augment.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(augment.IMAGENET_STD).view(3, 1, 1)
    plain = (plain - mean) / std
    assert x.shape == (3, 40, 60) and x.dtype == torch.float32 and torch.allclose(x, plain, atol=1e-5)
    erased = augment.random_erasing(x.clone(), np.random.default_rng(0), prob=1.0)
    assert (erased != x).any() and erased.shape == x.shape
    assert torch.equal(augment.random_erasing(x.clone(), np.random.default_rng(0), prob=0.0), x)


def test_loader_with_augmentation_switches(tmp_path):
    shards, nouns = make_shards(tmp_path)
    cfg = DataConfig(image_size=16, multi_label=2, shuffle_buffer=4, num_workers=1, rand_augment=True,
                     random_erasing=0.5)
    loader, nb, _ = make_train_loader(shards, nouns, cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                      context_length=16)
    batches = list(loader)
    assert len(batches) == nb and batches[0][0].shape == (4, 3, 16, 16) and batches[0][1].shape == (4, 3, 16)


RANK_SCRIPT = """
import json, os, sys, datetime
import torch, torch.distributed as dist
from groupvit.data.config import DataConfig
from groupvit.data.loader import make_train_loader
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
cfg = DataConfig(image_size=16, multi_label=3, shuffle_buffer=0, num_workers=int(sys.argv[3]))
loader, num_batches, _ = make_train_loader(sys.argv[1], sys.argv[2], cfg, batch_size=4, rank=rank, world_size=world,
                                           seed=0, context_length=16)
rows, steps = [], 0
for pixels, tokens in loader:
    t = torch.ones(1)
    dist.all_reduce(t)  # a DDP step: a rank with fewer batches would hang here
    rows += tokens[:, 0].tolist()
    steps += 1
json.dump({"steps": steps, "num_batches": num_batches, "rows": rows}, open(f"{sys.argv[4]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_get_disjoint_equal_length_streams(tmp_path):
    shards, nouns = make_shards(tmp_path)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(shards), str(nouns), "1", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == r0["num_batches"] == 32 // (4 * 2)
    a, b = {tuple(r) for r in r0["rows"]}, {tuple(r) for r in r1["rows"]}
    assert len(a) == len(r0["rows"]) == 16 and len(b) == 16
    assert not a & b  # disjoint: each rank read its own shards
    assert len(a | b) == 32
