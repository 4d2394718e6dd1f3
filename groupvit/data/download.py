"""Url list -> deterministic webdataset shards with img2dataset, resumable after any interruption.

Layout (all paths from `DownloadConfig`):

    <work_dir>/input.parquet      the url list normalised to columns url, caption (img2dataset's input)
    <work_dir>/state.json         fingerprint of input + output-changing options, shards already normalised
    <work_dir>/raw/               img2dataset's output folder (incremental mode: finished shards are never refetched)
    <output_dir>/NNNNN.tar        published shards: members sorted by key, fixed mtime/uid/gid/uname
    <output_dir>/NNNNN.parquet    img2dataset's per-row metadata (every row, failures too), sorted by key
    <output_dir>/NNNNN_stats.json img2dataset's shard stats without the timing fields

Why a work dir: DVC deletes a stage's outputs before it runs, and img2dataset's output is not byte-reproducible
(completion order, mtimes, durations). img2dataset writes to `raw/` (kept across runs, so a killed run resumes), each
finished shard is rewritten once in place into canonical form, and `output_dir` is rebuilt from hard links to those
files plus small normalised metadata. Same inputs -> same bytes -> DVC does not invalidate the nouns and train stages.
A changed url list or changed image options (the fingerprint) starts `raw/` afresh.

img2dataset runs as a subprocess (its CLI): it installs a SIGINT handler, which only works in
a main thread, so calling it in-process from a Prefect task thread fails.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from groupvit.atomic import atomic_dir, atomic_write
from groupvit.config import to_dict
from groupvit.data.config import DownloadConfig
from groupvit.data.distributed import ClusterError, check_distributor, launcher_command
from groupvit.data.server import LoopbackImageServer
from groupvit.data.urllist import loopback_address, read_url_list
from groupvit.errors import DataError
from groupvit.procs import TiedProcess

log = logging.getLogger(__name__)

# img2dataset options that change the bytes of the shards; anything else (processes, threads, timeout, retries,
# distributor) may differ between a killed run and its resume.
_CONTENT_OPTIONS = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_quality", "number_sample_per_shard",
                    "disallowed_header_directives", "min_image_size")
_TIMING_KEYS = ("duration", "start_time", "end_time")
_REFETCH_ROUNDS = 2  # extra img2dataset runs for shards that lost connections to our own (running) server
_TAR_FORMAT = "gnu-sorted-v1"  # bump when normalise_tar's output changes: finished shards are re-normalised


def _sha256_table(table: pa.Table) -> str:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# Keys only one engine reads: left out of the resolved config of a run on another, so that adding them kept the default
# download's output (resolved_config.yaml is one of its files) byte-identical.
_ENGINE_KEYS = {"pyspark": ("spark_master", "spark_conf"), "ray": ("ray_address",)}


def resolved_config(cfg: DownloadConfig) -> dict[str, Any]:
    """The config recorded beside the shards (`resolved_config.yaml`): every key but those of unused engines."""
    unused = {k for engine, keys in _ENGINE_KEYS.items() if engine != cfg.distributor for k in keys}
    return {k: v for k, v in to_dict(cfg).items() if k not in unused}


def prepare_work_dir(cfg: DownloadConfig, table: pa.Table) -> tuple[Path, dict[str, Any]]:
    """Write `input.parquet` and the state; wipe `raw/` when inputs or content options changed. Returns the state."""
    work = Path(cfg.work_dir)
    options = {k: v for k, v in to_dict(cfg).items() if k in _CONTENT_OPTIONS}
    fingerprint = hashlib.sha256((_sha256_table(table) + json.dumps(options, sort_keys=True)).encode()).hexdigest()
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if state.get("fingerprint") != fingerprint:
        if (work / "raw").exists():
            log.info("url list or image options changed since the last download: starting %s afresh", work / "raw")
            shutil.rmtree(work / "raw")
        work.mkdir(parents=True, exist_ok=True)
        atomic_write(work / "input.parquet", lambda tmp: pq.write_table(table, tmp))
        state = {"fingerprint": fingerprint, "rows": table.num_rows, "normalised": []}
        _write_json(state_file, state)
    return state_file, state


def finished_shards(raw: Path) -> set[int]:
    """Shard ids img2dataset has finished: it writes `NNNNN_stats.json` only after closing the tar and parquet."""
    return {int(p.name.split("_")[0]) for p in raw.glob("*_stats.json")} if raw.is_dir() else set()


def img2dataset_command(cfg: DownloadConfig, input_parquet: Path, raw: Path) -> list[str]:
    """The img2dataset CLI call (fire syntax: lists as JSON); for pyspark/ray, the launcher that sets up the engine
    first (`groupvit.data.distributed`)."""
    if cfg.distributor != "multiprocessing":  # Ray workers run in the head's working directory, not the stage's
        input_parquet, raw = input_parquet.resolve(), raw.resolve()
    args = {
        "url_list": str(input_parquet), "input_format": "parquet", "url_col": "url", "caption_col": "caption",
        "output_folder": str(raw), "output_format": "webdataset", "incremental_mode": "incremental",
        "image_size": cfg.image_size, "resize_mode": cfg.resize_mode,
        "resize_only_if_bigger": cfg.resize_only_if_bigger,
        "encode_quality": cfg.encode_quality, "min_image_size": cfg.min_image_size,
        "number_sample_per_shard": cfg.number_sample_per_shard, "processes_count": cfg.processes_count,
        "thread_count": cfg.thread_count, "retries": cfg.retries, "timeout": cfg.timeout,
        "max_shard_retry": cfg.max_shard_retry, "distributor": cfg.distributor, "enable_wandb": False,
        "disallowed_header_directives": json.dumps(list(cfg.disallowed_header_directives)),
    }
    cli = [a for k, v in args.items() for a in (f"--{k}", str(v))]
    if cfg.distributor != "multiprocessing":
        return launcher_command(cfg, cli, Path(cfg.work_dir).resolve())
    # `-c` rather than `-m img2dataset.main` (runpy warns that the module is imported twice)
    return [sys.executable, "-c", "import sys; from img2dataset.main import main; sys.exit(main())", *cli]


def run_img2dataset(cmd: list[str], log_file: Path, distributor: str = "multiprocessing") -> None:
    """Run img2dataset, its output appended to `log_file`; on any interruption stop it before re-raising.

    It runs as a `TiedProcess`: img2dataset and its pool workers (or its Spark driver and local executors) die with
    this process even when it is killed with SIGKILL (they would otherwise fetch every remaining shard from a server
    that died with us).

    Raises:
        ClusterError: img2dataset failed under `distributor` pyspark or ray (an executor, worker or node lost).
        RuntimeError: img2dataset failed under multiprocessing.
    """
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1",
               no_proxy=",".join(filter(None, [os.environ.get("no_proxy", ""), "127.0.0.1,localhost"])))
    with open(log_file, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = TiedProcess(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        except BaseException:
            # img2dataset's own SIGINT handler stops its logger and terminates its pool; the rest is killed after.
            proc.stop(signal.SIGINT, timeout=15)
            raise
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        if distributor != "multiprocessing":
            errors = [line.strip() for line in tail if re.search(r"(Error|Exception)\b", line)]
            last = (errors or [line for line in tail if line.strip()] or ["no output"])[-1][:300]
            raise ClusterError(f"download.distributor {distributor}: img2dataset failed (exit {rc}): {last}; nothing "
                               f"was published, finished shards are kept: rerun to resume (log: {log_file})")
        raise RuntimeError(f"img2dataset exited with {rc}; last lines of {log_file}:\n" + "\n".join(tail))


# Failure reasons are img2dataset's str() of the urllib exception, e.g. "<urlopen error [Errno 111] Connection
# refused>", "[Errno 104] Connection reset by peer", "Remote end closed connection without response" (the server died
# before answering), "IncompleteRead(100 bytes read, 4900 more expected)" (died while answering), "timed out".
_CONNECTION_ERRORS = ("connection refused", "connection reset", "connection aborted", "remote end closed connection",
                      "broken pipe", "incompleteread", "timed out", "errno 111", "errno 104", "errno 32")
# ... and, for internet url lists, what a machine without network gets ("<urlopen error [Errno -3] Temporary failure
# in name resolution>", "[Errno 101] Network is unreachable").
_NETWORK_ERRORS = _CONNECTION_ERRORS + ("name resolution", "name or service not known", "nodename nor servname",
                                        "network is unreachable", "no route to host", "errno -2", "errno -3",
                                        "errno 101", "errno 113")


def is_connection_error(reason: str, network: bool = False) -> bool:
    """Whether an img2dataset failure reason says the connection to the server failed (`network`: or the network)."""
    text = reason.lower()
    return any(k in text for k in (_NETWORK_ERRORS if network else _CONNECTION_ERRORS))


def reuse_problem(raw: Path, stem: str, own_server: bool) -> str | None:
    """Why the finished shard `stem` in `raw` must be fetched again, or None when a resume may reuse it.

    A shard img2dataset finished while the image server was gone (a killed download whose img2dataset lived on, a
    lost network) records every such row as a connection error and would be reused forever. `own_server`: the urls
    point at our own loopback server, which answers every request while it runs, so any connection error means it
    was gone. Internet url lists have dead hosts, so only a shard whose every row failed to connect is refused.
    """
    try:
        stats = json.loads((raw / f"{stem}_stats.json").read_text())
        rows = pq.read_metadata(raw / f"{stem}.parquet").num_rows
    except (OSError, ValueError) as e:  # killed while writing, or a lost machine's unflushed file
        return f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not (raw / f"{stem}.tar").is_file():
        return "its tar is missing"
    count = int(stats.get("count", -1))
    if rows != count:
        return f"its parquet has {rows} rows, its stats count {count}"
    failed = {r: int(n) for r, n in stats.get("status_dict", {}).items() if is_connection_error(r, not own_server)}
    if not failed or (not own_server and sum(failed.values()) < count):
        return None
    worst = max(failed, key=failed.__getitem__)
    return f"{sum(failed.values())} of {count} rows failed to connect (e.g. {worst!r})"


def discard_unusable(raw: Path, own_server: bool) -> dict[int, str]:
    """Delete the files of every finished shard `reuse_problem` refuses, so img2dataset fetches it again.

    Returns:
        {shard id: reason} of the discarded shards.
    """
    discarded = {}
    for stats_file in sorted(raw.glob("*_stats.json")) if raw.is_dir() else []:
        stem = stats_file.name.split("_")[0]
        problem = reuse_problem(raw, stem, own_server)
        if problem is None:
            continue
        log.warning("%s: shard %s is fetched again: %s", raw, stem, problem)
        stats_file.unlink()  # first: without it img2dataset and finished_shards() see an unfinished shard
        for suffix in (".tar", ".parquet"):
            (raw / f"{stem}{suffix}").unlink(missing_ok=True)
        discarded[int(stem)] = problem
    return discarded


def _tar_members_fast(buf: memoryview) -> list[tuple[bytes, int, int]] | None:
    """(name, data offset, size) of each regular member; None when the archive needs tarfile (long names, links).

    pax extended headers are skipped when they carry only attributes we rewrite anyway (img2dataset's
    webdataset writer emits one per member for its float mtime).
    """
    members, off = [], 0
    while off + 512 <= len(buf):
        header = bytes(buf[off:off + 512])
        if header == _ZERO_BLOCK:
            break
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        kind = header[156:157]
        if kind == b"x":
            pax = bytes(buf[off + 512:off + 512 + size])
            if any(f" {k}=".encode() in pax for k in ("path", "size", "linkpath")):
                return None
        elif kind not in (b"0", b"\0") or header[345:346] != b"\0":
            return None  # anything but a plain file with a short name: let tarfile handle it
        else:
            members.append((header[:100].rstrip(b"\0"), off + 512, size))
        off += 512 + -(-size // 512) * 512
    return members


_ZERO_BLOCK = bytes(512)


def _ustar_header(name: bytes, size: int) -> bytes:
    """The header `tarfile` writes in GNU format for a file with mode 0444, uid/gid 0, mtime 0, no user names."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000444\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148], h[148:156] = b"%011o\0" % size, b"00000000000\0", b" " * 8
    h[156:157], h[257:265] = b"0", b"ustar  \0"  # GNU magic: the format webdataset's TarWriter writes
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def normalise_tar(path: Path, fast: bool = True) -> None:
    """Rewrite a tar with members sorted by (key, extension) and fixed metadata, atomically (idempotent).

    `fast` parses and writes the (plain) headers directly: Python's tarfile spends ~1 ms per member on headers,
    hours for CC3M; the output bytes are identical to the tarfile path (tested), which remains the fallback.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        members = _tar_members_fast(view) if fast else None
        if members is not None and all(len(n) <= 100 for n, _, _ in members):
            members.sort(key=lambda m: m[0].partition(b".")[::2])

            def write_fast(tmp: Path) -> None:
                with open(tmp, "wb") as out:
                    written = 0
                    for name, off, size in members:
                        out.write(_ustar_header(name, size))
                        out.write(view[off:off + size])
                        pad = -size % 512
                        out.write(bytes(pad))
                        written += 512 + size + pad
                    out.write(bytes(1024))  # end-of-archive blocks, then padding to tarfile's 10240-byte records
                    out.write(bytes(-(written + 1024) % tarfile.RECORDSIZE))

            try:
                atomic_write(path, write_fast)
            finally:
                view.release()  # before the mmap closes, which it refuses while a view is exported
            return
        view.release()
    items: list[tuple[str, bytes]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                items.append((m.name, tar.extractfile(m).read()))  # type: ignore[union-attr]
    items.sort(key=lambda item: item[0].partition(".")[::2])

    def write_tarfile(tmp: Path) -> None:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in items:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write_tarfile)


def _normalised_stats(stats_file: Path) -> dict[str, Any]:
    stats = json.loads(stats_file.read_text())
    for k in _TIMING_KEYS:
        stats.pop(k, None)
    return stats


def publish(raw: Path, output_dir: Path, stems: list[str]) -> None:
    """Rebuild `output_dir` from the finished shards: hard links to the canonical tars, sorted metadata."""
    with atomic_dir(output_dir) as staging:
        for stem in stems:
            tar = raw / f"{stem}.tar"
            try:
                os.link(tar, staging / tar.name)
            except OSError:  # another file system: copy
                shutil.copyfile(tar, staging / tar.name)
            table = pq.read_table(raw / f"{stem}.parquet")
            table = table.sort_by("key")
            pq.write_table(table, staging / f"{stem}.parquet")
            _write_json(staging / f"{stem}_stats.json", _normalised_stats(raw / f"{stem}_stats.json"))


def _width(raw: Path) -> int:
    """Digits in img2dataset's shard names (oom_shard_count, 5 by default)."""
    names = [p.name.split("_")[0] for p in raw.glob("*_stats.json")]
    return len(names[0]) if names else 5


def normalise_reason(reason: str) -> str:
    """One stable line per failure kind: OpenCV's multi-line, version- and path-specific assertion texts are mapped
    to "image decoding failed" (with the assertion, e.g. "(-215:Assertion failed) !buf.empty()" for a 0-byte file);
    every other reason is reduced to its first line, stripped."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "unknown error"
    if first.startswith("OpenCV("):  # "OpenCV(4.14.0) /io/opencv/.../loadsave.cpp:1310: error: (-215:...) ..."
        detail = first.partition(" error: ")[2].split(" in function ")[0].strip()
        if "!buf.empty()" in detail:
            return "image decoding failed: empty file"
        return f"image decoding failed: {detail}" if detail else "image decoding failed"
    return first


def summarize(output_dir: Path) -> dict[str, Any]:
    """Success rate and failures by (normalised) reason over all published shards."""
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    reasons: dict[str, int] = {}
    for f in sorted(output_dir.glob("*_stats.json")):
        stats = json.loads(f.read_text())
        for k in totals:
            totals[k] += int(stats.get(k, 0))
        for reason, n in stats.get("status_dict", {}).items():
            if reason != "success":
                key = normalise_reason(reason)
                reasons[key] = reasons.get(key, 0) + int(n)
    return {**totals, "success_rate": totals["successes"] / max(totals["count"], 1),
            "failures_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))}


def download(cfg: DownloadConfig) -> dict[str, Any]:
    """Run the whole download: validate the url list, serve local images if asked, img2dataset, normalise, publish.

    Returns:
        metrics: counts, `success_rate`, `failures_by_reason`; `shards_fetched`, `shards_reused` of this run;
        `seconds`, `images_per_s` of the last run that fetched shards (its successes per second of img2dataset).

    Raises:
        DataError: bad url list (missing column, empty, non-loopback urls with `serve_dir`), missing serve_dir, or
            shards img2dataset did not finish.
    """
    table = read_url_list(cfg.url_list, cfg.input_format, cfg.url_col, cfg.caption_col)
    if cfg.serve_dir and not Path(cfg.serve_dir).is_dir():
        raise DataError(f"download.serve_dir: {cfg.serve_dir} is not a folder (set it to '' for internet url lists)")
    check_distributor(cfg)  # before any work: Java, the cluster's address, a server the cluster can reach
    state_file, state = prepare_work_dir(cfg, table)
    work, raw, output_dir = Path(cfg.work_dir), Path(cfg.work_dir) / "raw", Path(cfg.output_dir)
    expected = math.ceil(table.num_rows / cfg.number_sample_per_shard)
    own_server = bool(cfg.serve_dir)
    discarded = discard_unusable(raw, own_server)  # what the last run left: only verified shards are reused
    if set(discarded) & set(state["normalised"]):  # before refetching: a fetched-again tar is not normalised
        state["normalised"] = sorted(set(state["normalised"]) - set(discarded))
        _write_json(state_file, state)
    before = finished_shards(raw)
    seconds, rounds = 0.0, 0
    while len(finished_shards(raw)) < expected:
        cmd = img2dataset_command(cfg, work / "input.parquet", raw)
        log.info("img2dataset: %d rows -> %d shards (%d already finished)", table.num_rows, expected,
                 len(finished_shards(raw)))
        start = time.perf_counter()
        if own_server:
            host, port = loopback_address(table.column("url"), cfg.url_list)
            with LoopbackImageServer(cfg.serve_dir, host, port):
                run_img2dataset(cmd, work / "img2dataset.log", cfg.distributor)
        else:
            run_img2dataset(cmd, work / "img2dataset.log", cfg.distributor)
        seconds += time.perf_counter() - start
        rounds += 1
        # Our server was up all along, so a connection error now was a transient (a timeout on a loaded machine):
        # fetch those shards again at once rather than publish shards that differ from an uninterrupted run.
        fresh = discard_unusable(raw, True) if own_server else {}
        discarded.update(fresh)
        if not fresh or rounds > _REFETCH_ROUNDS:
            break
    after = finished_shards(raw)
    missing = sorted(set(range(expected)) - after)
    if missing:
        unusable = "; ".join(f"shard {i}: {discarded[i]}" for i in missing if i in discarded)
        raise DataError(f"{raw}: img2dataset did not finish shards {missing[:10]} (see {work / 'img2dataset.log'})"
                        + (f", discarded as unusable: {unusable[:300]}" if unusable else "") + "; rerun to resume")
    normalised = set(state["normalised"]) if state.get("tar_format") == _TAR_FORMAT else set()
    state["tar_format"] = _TAR_FORMAT
    width = _width(raw)
    for sid in sorted(after - normalised):
        normalise_tar(raw / f"{sid:0{width}d}.tar")
        normalised.add(sid)
        state["normalised"] = sorted(normalised)
        _write_json(state_file, state)
    publish(raw, output_dir, [f"{sid:0{width}d}" for sid in sorted(after)])
    metrics = summarize(output_dir)
    new_successes = sum(json.loads((raw / f"{sid:0{width}d}_stats.json").read_text())["successes"]
                        for sid in after - before)
    if after - before:  # remembered, so a rerun that fetches nothing still reports the download's throughput
        state["throughput"] = {"seconds": round(seconds, 3), "images": new_successes,
                               "images_per_s": round(new_successes / seconds, 2) if seconds else 0.0}
        _write_json(state_file, state)
    last = state.get("throughput", {"seconds": 0.0, "images_per_s": 0.0})
    metrics.update(shards=len(after), shards_fetched=len(after - before), shards_reused=len(before),
                   seconds=last["seconds"], images_per_s=last["images_per_s"])
    return metrics
