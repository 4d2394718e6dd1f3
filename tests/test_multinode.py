"""Training on several nodes, two torchrun agents on this machine standing in for two machines: the stage's
multi-node options, the rendezvous, a lost node (named, and its workers gone with its agent) and the restart.

Each node runs `groupvit train` in a working directory of its own; the checkpoints folder (`--train-dir`) is one
folder both pass, as a multi-node job needs (README "Many machines").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_train_stage import env, world, write_params  # noqa: F401 (world: the shared fixture of 32 scenes)

from groupvit.errors import ConfigError
from pipelines.launch import (
    LaunchOptions,
    add_multinode_arguments,
    lost_peers,
    multinode_options,
)
from pipelines.stages import train as stage

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "pipelines.cli", "train"]
NO_REGISTRY = ["--set", "tracking.registered_model="]  # the MLflow run is enough here, and cheaper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the options ------------------------------------------------------------------------------------------------

def test_multinode_options_become_torchruns_rendezvous_options():
    assert LaunchOptions(nproc=2).torchrun_args() == ["--standalone", "--nproc_per_node=2", "--max_restarts=0"]
    c10d = LaunchOptions(nproc=8, nnodes=2, rdzv_endpoint="node0:29500")
    assert c10d.torchrun_args() == ["--nnodes=2", "--nproc_per_node=8", "--max_restarts=0", "--rdzv_backend=c10d",
                                    "--rdzv_endpoint=node0:29500", "--rdzv_id=groupvit"]
    static = LaunchOptions(nproc=1, nnodes=3, node_rank=2, rdzv_endpoint="10.0.0.1:1234", rdzv_id="job-7",
                           rdzv_backend="static")
    assert static.torchrun_args()[-3:] == ["--rdzv_endpoint=10.0.0.1:1234", "--rdzv_id=job-7", "--node_rank=2"]
    for kwargs, message in [
        ({"nnodes": 2}, "--rdzv-endpoint: expected host:port"),
        ({"nnodes": 2, "rdzv_endpoint": "node0"}, "--rdzv-endpoint: expected host:port"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "static"}, "expected 0 .. 1"),
        ({"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "h:1"}, "only the static rendezvous uses it"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "etcd"}, "--rdzv-backend: expected one of"),
        ({"nnodes": 0}, "--nnodes: expected a number of machines >= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            LaunchOptions(**kwargs)


def test_the_stage_reads_multinode_options_from_its_command_line_then_the_environment():
    p = argparse.ArgumentParser()
    add_multinode_arguments(p)
    variables = {"GROUPVIT_NNODES": "4", "GROUPVIT_RDZV_ENDPOINT": "node0:29500", "GROUPVIT_RDZV_ID": "nightly"}
    opts = multinode_options(p.parse_args([]), nproc=2, env=variables)  # what `dvc repro` on a node gets
    assert (opts.nnodes, opts.nproc, opts.rdzv_endpoint, opts.rdzv_id, opts.rdzv_backend) == (
        4, 2, "node0:29500", "nightly", "c10d")
    opts = multinode_options(p.parse_args(["--nnodes", "2", "--rdzv-backend", "static", "--node-rank", "1"]), 1,
                             env=variables)
    assert (opts.nnodes, opts.node_rank, opts.rdzv_backend, opts.rdzv_id) == (2, 1, "static", "nightly")
    assert not multinode_options(p.parse_args([]), 1, env={}).multinode
    with pytest.raises(ConfigError, match=r"\$GROUPVIT_NNODES: expected a whole number, found 'two'"):
        multinode_options(p.parse_args([]), 1, env={"GROUPVIT_NNODES": "two"})


def test_a_plain_process_cannot_join_a_multinode_job(tmp_path, world, capsys):  # noqa: F811
    params = write_params(tmp_path, world)
    rc = stage.main(["--params", str(params), "--train-dir", str(tmp_path / "train"), "--launcher", "none",
                     "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:1"])
    assert rc == 2
    assert "--launcher none runs one plain process: it cannot join a 2-node job" in capsys.readouterr().err
    assert not (tmp_path / "train").exists()


def test_the_lost_node_is_named_from_the_roster():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid nobody holds any more
    host = socket.gethostname()
    roster = [{"rank": 0, "node": 0, "host": host, "agent_pid": os.getpid()},
              {"rank": 1, "node": 1, "host": host, "agent_pid": gone.pid},
              {"rank": 2, "node": 1, "host": host, "agent_pid": gone.pid},
              {"rank": 3, "node": 2, "host": "elsewhere", "agent_pid": 1}]
    assert lost_peers(roster, 0).startswith(f"node 0 lost node 1 (host {host}, ranks 1, 2, torchrun agent pid "
                                            f"{gone.pid} is gone): the job stopped without publishing anything")
    assert "its peers on other hosts are node 2 (host elsewhere, ranks 3): one of them was lost" in lost_peers(
        [roster[0], roster[3]], 0)
    assert lost_peers(roster[:3], 1) == ""  # node 1's only peer is alive: its errors are its own


# ---- two nodes on this machine -------------------------------------------------------------------------------

def start_node(workdir: Path, params: Path, options: list[str], dirs: list[str], log: str,
               variables: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`groupvit train` of one node (or of the reference) in its own working directory; output to `workdir/<log>`."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / log).open("w") as out:
        return subprocess.Popen(TRAIN + ["--params", str(params), *NO_REGISTRY, *options, *dirs],
                                env={**env(), **(variables or {})}, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                text=True)


def agent_and_workers(node: subprocess.Popen[str]) -> tuple[psutil.Process, list[psutil.Process]]:
    """The torchrun agent and the workers started by one node's `groupvit train`."""
    agent, workers = None, []
    for p in psutil.Process(node.pid).children(recursive=True):
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if line.startswith(f"{sys.executable} -m torch.distributed.run "):
            agent = p
        elif line.startswith(f"{sys.executable} -u -m pipelines.stages.train "):
            workers.append(p)
    assert agent is not None and workers, f"no torchrun agent and worker under {node.pid}"
    return agent, workers


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"({path} missing)"


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """The `groupvit train` processes a test starts, killed at its end whatever happened (their torchrun agents and
    workers go with them)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_two_nodes_train_as_one_job_a_lost_node_stops_the_other_and_a_restart_resumes_to_the_same_weights(
        tmp_path, world, started):  # noqa: F811
    steps, timeout = 4, 180  # generous: a rank 0 that sets up MLflow on a busy machine keeps the others waiting
    train = dict(steps=steps, batch_size=4, log_every=2, ckpt_every=1, dist_timeout_s=timeout)
    # the reference: the same run as 2 processes under one agent (its own MLflow store), alongside the nodes
    (tmp_path / "ref").mkdir()
    ref_params = write_params(tmp_path / "ref", world, nproc=2, **train)
    reference = start_node(tmp_path / "ref", ref_params, [], ["--train-dir", "train", "--model-dir", "model",
                                                               "--metrics-dir", "metrics"], "ref.log")
    params = write_params(tmp_path, world, nproc=1, **train)
    shared = tmp_path / "shared"  # storage both nodes see: the checkpoints, and here node 0's outputs too
    dirs = ["--train-dir", str(shared / "train"), "--model-dir", str(shared / "model"),
            "--metrics-dir", str(shared / "metrics")]
    node_dir = [tmp_path / "node0", tmp_path / "node1"]
    c10d = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "test-job"]
    nodes = [start_node(node_dir[n], params, c10d, dirs, "lost.log") for n in (0, 1)]
    started += [reference, *nodes]
    latest = shared / "train/checkpoints/latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and all(n.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert latest.exists(), _tail(node_dir[0] / "lost.log")
    agent, workers = agent_and_workers(nodes[1])
    agent.kill()  # node 1 is lost: its torchrun agent, and with it (`_die_with_agent`) its worker
    lost_at = time.monotonic()
    rc = nodes[0].wait(timeout=timeout + 60)
    waited = time.monotonic() - lost_at
    out = (node_dir[0] / "lost.log").read_text()
    assert rc != 0 and waited < timeout, f"exit {rc} after {waited:.0f} s:\n{out[-3000:]}"  # no hang
    assert re.search(rf"error: node \d lost node \d \(host [^,]+, ranks \d, torchrun agent pid {agent.pid} is gone\)",
                     out), out[-3000:]
    assert "error: training failed (torchrun exit code 1)" in out
    assert nodes[1].wait(timeout=60) != 0, _tail(node_dir[1] / "lost.log")
    assert not (shared / "model").exists() and not (shared / "metrics/train.json").exists()  # nothing published
    deadline = time.monotonic() + 30  # a poll every 0.5 s, then the worker unwinds (10 s at most)
    while any(_alive(p.pid) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p.pid) for p in workers), "the lost node's worker trained on without its agent"
    step = int(latest.read_text().strip()[len("step_"):-len(".pt")])
    assert 1 <= step < steps

    # Restart both, here with the static rendezvous (node 0 is global rank 0). Node 1 has its options from the
    # variables, as `dvc repro` would, starts first and waits for node 0; it keeps its outputs local: it has none to
    # write, and says so.
    endpoint = f"127.0.0.1:{free_port()}"
    variables = {"GROUPVIT_NNODES": "2", "GROUPVIT_NODE_RANK": "1", "GROUPVIT_RDZV_BACKEND": "static",
                 "GROUPVIT_RDZV_ENDPOINT": endpoint}
    node1 = start_node(node_dir[1], params, [], dirs[:2], "restart.log", variables)
    node0 = start_node(node_dir[0], params, ["--nnodes", "2", "--node-rank", "0", "--rdzv-backend", "static",
                                             "--rdzv-endpoint", endpoint], dirs, "restart.log")
    started += [node0, node1]
    assert node0.wait(timeout=300) == 0, _tail(node_dir[0] / "restart.log")
    assert node1.wait(timeout=60) == 0, _tail(node_dir[1] / "restart.log")
    assert f"resumed from {shared / 'train/checkpoints'}/step_{step:06d}.pt at step {step} of {steps}" in (
        node_dir[0] / "restart.log").read_text()
    assert "train: global rank 0 ran on another node" in (node_dir[1] / "restart.log").read_text()
    assert not (node_dir[1] / "metrics").exists()
    assert json.loads((shared / "metrics/train.json").read_text())["steps"] == steps

    assert reference.wait(timeout=300) == 0, _tail(tmp_path / "ref/ref.log")
    a, b = load_file(tmp_path / "ref/model/model.safetensors"), load_file(shared / "model/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # gloo on CPU is deterministic: two agents of one process train what one agent of two does
        assert torch.equal(a[k], b[k]), k
