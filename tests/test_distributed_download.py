"""The download stage on Spark (local-cluster) and Ray (a loopback head) with the real img2dataset: the same shard
bytes and counts as a multiprocessing run, no JVM outliving a killed stage, and a missing engine, cluster or Java is a
named error before any work."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_download import ROOT, _closed_port, _descendants, _jpeg, _params, _procs, _run_stage

from groupvit.data.server import LoopbackImageServer

N_GOOD, SHARD = 10, 4  # + a 404, a refused connection and non-image bytes: 13 rows -> 4 shards
COUNTS = ("count", "successes", "failed_to_download", "failed_to_resize", "failures_by_reason")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small url list with one failure of each kind, served on loopback for the whole module."""
    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    images.mkdir()
    for i in range(N_GOOD):
        (images / f"{i}.jpg").write_bytes(_jpeg(i))
    (images / "text.jpg").write_bytes(b"<html>this is not an image</html>" * 10)
    server = LoopbackImageServer(images).start()
    rows = [(f"{server.url}/{i}.jpg", f"photo {i} of a cat") for i in range(N_GOOD)]
    bad = [f"{server.url}/missing.jpg", f"http://127.0.0.1:{_closed_port()}/x.jpg", f"{server.url}/text.jpg"]
    for j, url in enumerate(bad):  # one per shard
        rows.insert(SHARD * j + 1, (url, f"bad row {j}"))
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), root / "urls.parquet")
    yield root
    server.stop()


@pytest.fixture(scope="module")
def multiprocessing_run(world):
    assert _run_stage(_params(world, "mp", number_sample_per_shard=SHARD), world / "mp") == 0
    return world / "mp"


def _assert_same_download(run: Path, reference: Path) -> None:
    """Published files byte-identical (resolved_config.yaml names the distributor), the same counts and reasons."""
    names = sorted(p.name for p in (reference / "shards").iterdir() if p.name != "resolved_config.yaml")
    assert len(names) == 3 * 4  # tar, parquet, stats of 4 shards
    assert names == sorted(p.name for p in (run / "shards").iterdir() if p.name != "resolved_config.yaml")
    for name in names:
        assert (run / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes(), name
    metrics, expected = (json.loads((r / "metrics" / "download.json").read_text()) for r in (run, reference))
    assert {k: metrics[k] for k in COUNTS} == {k: expected[k] for k in COUNTS}
    assert (metrics["successes"], metrics["failed_to_download"], metrics["failed_to_resize"]) == (N_GOOD, 2, 1)


def _left_behind(tree: set[int], marker: str) -> list[str]:
    """Live processes of `tree`, or whose command line names `marker` (a JVM's classpath names its SPARK_HOME)."""
    return [cmd for pid, (_, cmd) in _procs().items() if pid in tree or marker in cmd]


def _kill_all(tree: set[int], marker: str) -> None:
    """Only when a test failed: SIGKILL what it left."""
    for pid, (_, cmd) in _procs().items():
        if pid in tree or marker in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="no java: `make java` installs Debian's default-jre-headless")
def test_spark_local_cluster_dies_with_the_stage_and_matches_multiprocessing(world, multiprocessing_run):
    """The stage killed with SIGKILL once its Spark driver JVM runs takes it along (executors are its children, in
    the same process group); the rerun (on Spark) publishes the multiprocessing run's bytes and counts."""
    run = world / "spark"
    # One worker: its executor's python worker imports img2dataset once for all shards (2 cores, shared in CI).
    params = _params(world, "spark", number_sample_per_shard=SHARD, distributor="pyspark",
                     spark_master="local-cluster[1,1,1024]")
    work = str((run / "work").resolve())
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "download", "--params", str(params)], cwd=run,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, process_group=0)
    tree: set[int] = set()
    try:
        deadline, jvms = time.monotonic() + 300, []
        while not jvms and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            jvms = [c for c in _left_behind(set(), work) if "org.apache.spark" in c]  # its classpath: <work>/spark
        tree = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert jvms, f"no Spark JVM started: {(run / 'work' / 'img2dataset.log').read_text()[-2000:]}"
        deadline = time.monotonic() + 10  # the watchdog's SIGKILL within its poll interval; generous when busy
        while _left_behind(tree, work) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _left_behind(tree, work)
    finally:
        _kill_all(tree, work)
    assert _run_stage(params, run) == 0
    assert not _left_behind(set(), work)  # the session stopped: no driver or executor JVM left
    _assert_same_download(run, multiprocessing_run)


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with 2 CPUs, stopped afterwards: SIGTERM to its `--block` process, then its
    process group (`ray stop` would stop every Ray on the machine, not only this one)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    port = _closed_port()
    log = open(Path(temp) / "head.log", "w")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address",
                             "127.0.0.1", "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "false",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, process_group=0,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{BIN}:{os.environ['PATH']}"))
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in Path(log.name).read_text() and time.monotonic() < deadline:
            assert head.poll() is None, Path(log.name).read_text()[-2000:]
            time.sleep(0.2)
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        log.close()
        leftover = _left_behind(set(), temp)
        _kill_all(set(), temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, leftover


@pytest.mark.slow
def test_ray_head_matches_multiprocessing(world, multiprocessing_run, ray_head):
    params = _params(world, "ray", number_sample_per_shard=SHARD, distributor="ray", ray_address=ray_head)
    assert _run_stage(params, world / "ray") == 0
    _assert_same_download(world / "ray", multiprocessing_run)


@pytest.mark.parametrize("extra, java_home, expected", [
    ({"distributor": "ray", "ray_address": "127.0.0.1:{port}"}, False,
     "error: download.ray_address: no Ray head answers at 127.0.0.1:{port}"),
    ({"distributor": "ray"}, False, "error: download.ray_address: distributor ray needs the address of a running"),
    ({"distributor": "pyspark", "spark_master": "spark://127.0.0.1:{port}"}, False,
     "error: download.spark_master: no Spark master answers at 127.0.0.1:{port}"),
    ({"distributor": "pyspark"}, True, "error: download.distributor: pyspark needs Java 17+ and no java was found in "
                                       "JAVA_HOME"),
], ids=["no-ray-head", "no-ray-address", "no-spark-master", "no-java"])
def test_missing_cluster_or_java_fails_before_any_work(world, tmp_path, monkeypatch, capsys, extra, java_home,
                                                       expected):
    port = _closed_port()
    extra = {k: v.format(port=port) for k, v in extra.items()}
    if java_home:
        monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # an empty folder: no bin/java
    name = f"fail_{port}"
    assert _run_stage(_params(world, name, **extra), world / name) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.format(port=port)) and err.count("\n") == 1 and "Traceback" not in err
    assert not list((world / name).iterdir())  # nothing written: no work dir, shards or metrics
