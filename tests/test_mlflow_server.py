"""`make mlflow-server`: a real `mlflow server` (sqlite store, proxied artifacts) on a free 127.0.0.1 port, the train
stage and promotion logging to it over HTTP, everything read back by another process that has only the URL; and the
stopped server is a named error before any work."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
from test_train_stage import stage_args, world, write_params  # noqa: F401 (world: the module's shards fixture)

from groupvit.procs import TiedProcess
from pipelines import mlflow_server
from pipelines.promotion import promote_if_better
from pipelines.stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]

READER = """
import hashlib, json, sys
import mlflow
from mlflow import MlflowClient

client = MlflowClient()  # MLFLOW_TRACKING_URI only: no store path, no artifact folder
exp = client.get_experiment_by_name("test")
run = client.search_runs([exp.experiment_id], "tags.stage = 'train'")[0]
champion = client.get_model_version_by_alias("gv-test", "champion")
folder = mlflow.artifacts.download_artifacts("models:/gv-test@champion", dst_path="downloaded")
print(json.dumps({"run_id": run.info.run_id, "status": run.info.status, "artifact_uri": run.info.artifact_uri,
                  "steps": run.data.params["train.steps"], "loss_steps": [m.step for m in
                                                               client.get_metric_history(run.info.run_id, "loss")],
                  "champion": champion.version, "miou": champion.tags["miou"],
                  "sha256": hashlib.sha256(open(folder + "/model.safetensors", "rb").read()).hexdigest()}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_command(port: int, folder: Path) -> list[str]:
    """The command `make mlflow-server` runs (its dry run), with this interpreter."""
    out = subprocess.run(["make", "-s", "-n", "mlflow-server", f"MLFLOW_PORT={port}", f"MLFLOW_SERVER_DIR={folder}",
                          "MLFLOW_WORKERS=1"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.replace("\\\n", " ").splitlines() if "pipelines.mlflow_server" in ln]  # after `install`
    assert len(line) == 1, out
    cmd = shlex.split(line[0])
    assert cmd[1:3] == ["-m", "pipelines.mlflow_server"], out
    return [sys.executable, *cmd[1:]]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def server_processes(folder: Path) -> list[psutil.Process]:
    """The `mlflow server` and its uvicorn workers started for `folder` (found by its path on their command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(folder) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return found


@pytest.fixture(autouse=True)
def keep_threads():
    """The in-process train stage sets torch's thread count: restore it for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="reads the command from the Makefile")
def test_train_and_promotion_over_http_are_readable_from_another_clone(tmp_path, world):  # noqa: F811
    port, folder = free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = TiedProcess(make_command(port, folder), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240  # seconds on a busy 2-core machine
        while not healthy(uri):
            assert server.poll() is None and time.monotonic() < deadline, f"mlflow server on {uri} never answered"
            time.sleep(0.5)

        # The train stage (2 steps) logs its run, model files and registered version over HTTP; then promotion.
        params = write_params(tmp_path, world, steps=2, log_every=1, ckpt_every=2)
        http = ["--set", f"tracking.uri={uri}"]
        assert train_stage.main(stage_args(tmp_path, params) + http) == 0
        record = json.loads((tmp_path / "model/mlflow.json").read_text())
        from mlflow import MlflowClient

        decision = promote_if_better(MlflowClient(uri), "gv-test", record["version"], 0.25)
        assert decision.promoted

        # Another clone: a fresh process in an empty folder, with nothing but the URL.
        reader = tmp_path / "other-clone"
        reader.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        out = subprocess.run([sys.executable, "-c", READER], cwd=reader, env={**env, "MLFLOW_TRACKING_URI": uri},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        weights = (tmp_path / "model/model.safetensors").read_bytes()
        assert seen["run_id"] == record["run_id"] and seen["status"] == "FINISHED"
        assert seen["steps"] == "2" and seen["loss_steps"] == [1, 2]
        assert seen["champion"] == str(record["version"]) and float(seen["miou"]) == 0.25
        assert seen["sha256"] == hashlib.sha256(weights).hexdigest()
        # proxied: the run's artifacts are the server's (mlflow-artifacts:/), stored in its folder, not the client's
        assert seen["artifact_uri"].startswith("mlflow-artifacts:/")
        stored = list((folder / "artifacts").rglob("model.safetensors"))
        assert len(stored) == 1 and stored[0].read_bytes() == weights

        # SIGTERM (as make passes on) stops the server and its workers.
        assert server_processes(folder)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (143, -signal.SIGTERM)
        gone, alive = psutil.wait_procs(server_processes(folder), timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if server.poll() is None:
            server.stop(signal.SIGTERM, timeout=30)

    # The server is gone: the next training fails at once with the URL named, before any work.
    rc = train_stage.main(stage_args(tmp_path / "again", params) + http)
    assert rc == 2 and not (tmp_path / "again").exists()


def test_a_port_in_use_is_a_named_error(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert mlflow_server.main(["--dir", str(tmp_path / "s"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "MLFLOW_PORT" in err
