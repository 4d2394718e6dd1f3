"""The training loader: webdataset shards + noun sidecars -> (pixels, tokens) batches, equal per rank (torchrun).

Pipeline per rank and worker (a `wds.DataPipeline` in a `wds.WebLoader`):

    ShardStream     endless shard stream: pass p of epoch e is a permutation seeded by (seed, e, p), identical on
                    every rank; slot (rank, worker) takes every (world * workers)-th shard of it, so within a pass
                    the ranks read disjoint shards, and no worker is ever without shards
    tar -> samples  `wds.tarfile_to_samples` (corrupt tars: counted and skipped by the `SkipGuard`)
    shuffle         sample buffer seeded by (seed, rank, worker, epoch)
    transform       decode, augment, look up the sample's words in its shard's sidecar, K prompts (bad samples:
                    counted and skipped by the `SkipGuard`)
    batch           `wds.batched(partial=False)`, then caption + prompts tokenised together: tokens [B, 1+K, L]
    with_epoch      exactly `num_batches = num_samples // (batch_size * world_size)` batches per rank per epoch

Endless resampled streams cut by `with_epoch` are what keeps DDP from hanging: every rank yields the same number of
batches whatever the shard sizes (webdataset #188, #225, #250). Rank and world size are arguments, not read from the
environment. A corrupt or undecodable sample never crashes training: it is skipped, counted (per process in
`skipped_samples()`, and across the loader's worker processes in the optional shared `skip_counter`) and logged with
its shard and key. Data that is mostly bad is a `DataError` naming the shards (`SkipGuard`: the endless stream would
otherwise skip forever), as are a missing shard or sidecar and a sample missing from its sidecar.
"""
from __future__ import annotations

import collections
import functools
import io
import logging
import multiprocessing
import multiprocessing.sharedctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from groupvit.data import augment
from groupvit.data.config import DataConfig
from groupvit.data.nouns import list_shards, load_sidecar, sidecar_for
from groupvit.data.prompts import prompted_texts
from groupvit.errors import ConfigError, DataError

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# ---- skipped samples: counted and logged, never a crash; but mostly-bad data stops the run ----
# The shard stream is endless, so skipping without a bound turns data that does not decode into a silent infinite
# loop (all-corrupt shards: 580,700 skips in 90 s, no error). Two bounds, checked in each loader process (a worker
# reads only its own shards, so one worker's view is enough to judge them):
# - MAX_CONSECUTIVE_SKIPS attempts in a row without one good sample. img2dataset re-encodes every image it writes,
#   so healthy shards have isolated bad samples (a corrupt tar is a single skip); even at a 50% bad rate, 200 in a
#   row has probability 2^-200. All-corrupt shards reach it after a few milliseconds of failed decodes.
# - more than MAX_SKIP_SHARE of the last SKIP_WINDOW attempts skipped: data that still yields a trickle of good
#   samples (90% corrupt) would otherwise train on a small, biased remainder at a fraction of the speed. A window of
#   1000 spans several shards of a real dataset, so one bad shard among good ones does not trip it.
MAX_CONSECUTIVE_SKIPS = 200
SKIP_WINDOW = 1000
MAX_SKIP_SHARE = 0.5
_SKIPPED = collections.Counter()  # this process's skips by exception type, all loaders together


def skipped_samples() -> dict[str, int]:
    """Samples skipped in this process so far, by exception type (loader workers count their own and log them)."""
    return dict(_SKIPPED)


def shared_skip_counter() -> multiprocessing.sharedctypes.Synchronized:
    """A skip counter the loader's worker processes add to and the main process reads (`.value`).

    Pass the same one to every `make_train_loader` call of a run (one loader per epoch) to count the whole run.
    """
    return multiprocessing.Value("q", 0)


class SkipGuard:
    """Counts, logs and bounds the samples one loader process skips (each worker holds its own copy).

    Used as the webdataset handler of the tar stage (`handler`) and told the outcome of every transformed sample
    (`good`, `skip`). Raises `DataError` when the skips pass `MAX_CONSECUTIVE_SKIPS` or `MAX_SKIP_SHARE`.
    """

    def __init__(self, rank: int, counter: multiprocessing.sharedctypes.Synchronized | None = None):
        self.rank, self.counter = rank, counter
        self.skipped, self.consecutive, self.window_skips = 0, 0, 0
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIP_WINDOW)  # True: that attempt skipped
        self.by_shard: collections.Counter[str] = collections.Counter()
        self.example = ""  # the latest skipped sample and why, for the error message

    def _record(self, skipped: bool) -> None:
        if len(self.recent) == SKIP_WINDOW:
            self.window_skips -= self.recent[0]  # the attempt about to leave the window
        self.recent.append(skipped)
        self.window_skips += skipped

    def good(self) -> None:
        """A sample was transformed."""
        self.consecutive = 0
        self._record(False)

    def skip(self, exn: Exception, url: str | None, key: str | None, reason: str | None = None) -> None:
        """Count and log the bad sample `key` of shard `url` (a whole tar when `key` is None); raise past a bound.

        Args:
            exn: what went wrong (DataError and ConfigError are re-raised: they are not bad samples).
            url, key: the sample's shard and key, where known.
            reason: `exn` as text (default `str(exn)`).
        """
        if isinstance(exn, (DataError, ConfigError)):  # a stale sidecar, a bad config: never skipped
            raise exn
        _SKIPPED[type(exn).__name__] += 1
        if self.counter is not None:
            with self.counter.get_lock():
                self.counter.value += 1
        self.skipped += 1
        self.consecutive += 1
        self._record(True)
        shard = str(url) if url else "an unknown shard"
        self.by_shard[shard] += 1
        reason = f"{type(exn).__name__}: {exn if reason is None else reason}"[:200]
        self.example = (f"sample {key!r} of {shard}" if key else shard) + f" ({reason})"
        if self.skipped <= 5 or self.skipped % 100 == 0:
            log.warning("skipped bad %s; %d skipped so far in loader worker %s of rank %d", self.example,
                        self.skipped, _worker_name(), self.rank)
        self._check()

    def handler(self, exn: Exception) -> bool:
        """webdataset handler of the tar stage: a corrupt or unreadable tar is skipped (webdataset appends the url)."""
        url = exn.args[-1] if len(exn.args) > 1 and isinstance(exn.args[-1], str) else None
        self.skip(exn, url, None, str(exn.args[0]) if exn.args else None)  # not str(exn): the appended stream
        return True

    def _check(self) -> None:
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            what = f"the last {self.consecutive} samples read in a row could not be used"
        elif len(self.recent) == SKIP_WINDOW and self.window_skips > MAX_SKIP_SHARE * SKIP_WINDOW:
            what = (f"{self.window_skips} of the last {SKIP_WINDOW} samples read could not be used (more than "
                    f"{MAX_SKIP_SHARE:.0%})")
        else:
            return
        shards = ", ".join(f"{url} ({n} skipped)" for url, n in self.by_shard.most_common(3))
        more = len(self.by_shard) - 3
        if more > 0:
            shards += f" and {more} more shard{'s' if more > 1 else ''}"
        raise DataError(f"{what} (loader worker {_worker_name()} of rank {self.rank}): the shards hold corrupt or "
                        f"undecodable data: {shards}; e.g. "
                        f"{self.example}. Rebuild the shards (`groupvit download`, then `groupvit nouns`) or remove "
                        f"the bad ones with their noun sidecars")


def _transform_samples(samples: Iterator[dict], transform: Any, guard: SkipGuard) -> Iterator[Any]:
    """`wds.map(transform)` that tells `guard` each outcome, naming a bad sample's shard and key when it skips it."""
    for sample in samples:
        try:
            out = transform(sample)
        except Exception as exn:  # DataError / ConfigError are re-raised by the guard
            guard.skip(exn, sample.get("__url__"), sample.get("__key__"))
            continue
        guard.good()
        yield out


def _worker_name() -> str:
    worker = torch.utils.data.get_worker_info()
    return str(worker.id) if worker else "main"


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless stream of `{"url": shard}` for one (rank, worker) slot; see the module docstring."""

    def __init__(self, shards: list[str], seed: int, rank: int, world_size: int):
        super().__init__()
        self.shards, self.seed, self.rank, self.world_size = shards, seed, rank, world_size
        self.epoch = -1  # advanced by each iteration (loader workers are persistent, so it survives epochs)

    def __iter__(self) -> Iterator[dict[str, str]]:
        self.epoch += 1  # now, not at the first next(): the shuffle stage seeds itself from it
        return self._stream(self.epoch)

    def _stream(self, epoch: int) -> Iterator[dict[str, str]]:
        worker, num_workers = _worker()
        slot, num_slots = self.rank * num_workers + worker, self.world_size * num_workers
        position, n_pass = 0, 0
        while True:
            order = np.random.default_rng([self.seed, epoch, n_pass]).permutation(len(self.shards))
            for i in order:
                if position % num_slots == slot:
                    yield {"url": self.shards[i]}
                position += 1
            n_pass += 1


def _shuffle(samples: Iterator[dict], bufsize: int, seed: int, rank: int, stream: ShardStream) -> Iterator[dict]:
    if bufsize < 2:
        yield from samples
        return
    rng = np.random.default_rng([seed, rank, _worker()[0], stream.epoch, 1])
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = int(rng.integers(bufsize))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)  # type: ignore[arg-type]
    yield from buf


class SampleTransform:
    """Sample dict -> (pixels [3, S, S], texts [1+K]); sidecars loaded when a shard is first seen (small LRU)."""

    def __init__(self, cfg: DataConfig, nouns_dir: str | None, seed: int, rank: int, cache: int = 16):
        self.cfg, self.nouns_dir, self.seed, self.rank, self.cache = cfg, nouns_dir, seed, rank, cache
        self._sidecars: collections.OrderedDict[str, dict[str, list[str]]] = collections.OrderedDict()
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:  # created in the worker process: one independent stream per (seed, rank, worker)
            self._rng = np.random.default_rng([self.seed, self.rank, _worker()[0], 2])
        return self._rng

    def words(self, url: str, key: str) -> list[str]:
        if url not in self._sidecars:
            self._sidecars[url] = load_sidecar(sidecar_for(url, self.nouns_dir))  # type: ignore[arg-type]
            if len(self._sidecars) > self.cache:
                self._sidecars.popitem(last=False)
        sidecar = self._sidecars[url]
        if key not in sidecar:
            raise DataError(f"{sidecar_for(url, self.nouns_dir)}: no entry for sample {key!r} of {url}; the sidecars "
                            f"are stale, rerun `groupvit nouns`")
        return sidecar[key]

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        cfg, rng = self.cfg, self.rng
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} of {sample.get('__url__')} has no image "
                             f"(members: {sorted(k for k in sample if not k.startswith('__'))})")
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")  # decodes fully: truncated or corrupt bytes raise here and are counted
        caption = sample.get("txt", b"").decode("utf-8", errors="replace")
        img = augment.random_resized_crop(img, cfg.image_size, rng, cfg.crop_scale, cfg.crop_ratio)
        if rng.random() < cfg.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if cfg.rand_augment:
            img = augment.rand_augment(img, rng, cfg.rand_augment_ops, cfg.rand_augment_magnitude,
                                       cfg.rand_augment_mstd)
        x = augment.to_normalised_tensor(img)  # [3, S, S]
        if cfg.random_erasing > 0:
            x = augment.random_erasing(x, rng, cfg.random_erasing)
        words = self.words(sample["__url__"], sample["__key__"]) if cfg.multi_label else []
        return x, prompted_texts(caption, words, cfg.multi_label, rng)


def collate(samples: list[tuple[torch.Tensor, list[str]]], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack pixels [B, 3, S, S]; tokenise all B * (1+K) texts at once -> [B, 1+K, L]."""
    from groupvit.tokenizer import tokenize

    pixels = torch.stack([x for x, _ in samples])
    texts = [t for _, ts in samples for t in ts]
    tokens = tokenize(texts, context_length=context_length)  # [B * (1+K), L]
    return pixels, tokens.view(len(samples), -1, context_length)


def count_samples(shards: list[Path], nouns_dir: str | None) -> int:
    """Samples in the shards: from the sidecars (one entry per sample), else from img2dataset's stats."""
    import json

    total = 0
    for tar in shards:
        if nouns_dir is not None:
            total += len(load_sidecar(sidecar_for(tar, nouns_dir)))
        else:
            stats = tar.with_name(f"{tar.stem}_stats.json")
            if not stats.is_file():
                raise DataError(f"{stats}: stats file missing; cannot count the samples of {tar.name}")
            total += int(json.loads(stats.read_text())["successes"])
    return total


def make_train_loader(shards_dir: str | Path, nouns_dir: str | Path | None, cfg: DataConfig, *, batch_size: int,
                      rank: int, world_size: int, seed: int, context_length: int = 77,
                      skip_counter: multiprocessing.sharedctypes.Synchronized | None = None
                      ) -> tuple[wds.WebLoader, int, int]:
    """Build the training loader of one rank.

    Args:
        shards_dir: folder of `NNNNN.tar` webdataset shards.
        nouns_dir: folder of `NNNNN.json` sidecars (may be None when `cfg.multi_label == 0`).
        cfg: loader and augmentation settings.
        batch_size: per-rank batch size.
        rank, world_size: this process's rank and the number of ranks (explicit, not read from the environment).
        seed: base seed (shard order is shared by all ranks; shuffling and augmentation differ per rank and worker).
        context_length: token length L.
        skip_counter: a `shared_skip_counter()` that counts the samples this loader skips, in all its worker
            processes (including samples read ahead of training); None: counted per process only.

    Returns:
        `(loader, num_batches, num_samples)`: each iteration of `loader` is one epoch of exactly `num_batches`
        batches `(pixels [B, 3, S, S] float32, tokens [B, 1+K, L] int64)`, on every rank.

    Raises:
        DataError: no shards, a missing shard or sidecar, or fewer samples than one global batch; while iterating,
            a sample missing from its sidecar, or mostly undecodable data (see `SkipGuard`).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, {world_size})")
    if cfg.multi_label and nouns_dir is None:
        raise ConfigError("data.multi_label > 0 needs the noun sidecars (nouns_dir)")
    shards = list_shards(shards_dir)
    nouns = str(nouns_dir) if nouns_dir is not None else None
    if nouns is not None:
        for tar in shards:  # fail now, naming the file, rather than inside a loader worker
            if not sidecar_for(tar, nouns).is_file():
                raise DataError(f"{sidecar_for(tar, nouns)}: noun sidecar missing for shard {tar} "
                                f"(run `groupvit nouns`)")
    num_samples = count_samples(shards, nouns)
    num_batches = num_samples // (batch_size * world_size)
    if num_batches < 1:
        raise DataError(f"{shards_dir}: {num_samples} samples are fewer than one global batch "
                        f"({batch_size} x {world_size} ranks)")
    stream = ShardStream([str(t) for t in shards], seed, rank, world_size)
    guard = SkipGuard(rank, skip_counter)  # copied into each worker process; the counter is shared
    pipeline = wds.DataPipeline(
        stream,
        wds.tarfile_to_samples(handler=guard.handler),
        functools.partial(_shuffle, bufsize=cfg.shuffle_buffer, seed=seed, rank=rank, stream=stream),
        functools.partial(_transform_samples, transform=SampleTransform(cfg, nouns, seed, rank), guard=guard),
        wds.batched(batch_size, collation_fn=functools.partial(collate, context_length=context_length),
                    partial=False),
    )
    workers = cfg.num_workers
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                           pin_memory=torch.cuda.is_available(), prefetch_factor=4 if workers else None)
    return loader.with_epoch(num_batches), num_batches, num_samples
