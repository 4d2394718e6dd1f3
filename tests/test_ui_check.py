"""pipelines.ui_check: the servers it starts for the check never outlive it (a real `mlflow ui`, no browser)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (session id, command line) of every running (not zombie) process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] not in ("Z", "X"):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    out[int(entry.name)] = (int(fields[3]), cmdline)
    return out


def wait_until(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def ablation_store(tmp_path_factory) -> str:
    """A tracking database holding an ablation parent run with one child, as `groupvit ablate` leaves it."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"  # unique: on the `mlflow ui` command line
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("ablation")
    parent = client.create_run(experiment, tags={"groupvit.ablation": "parent"})
    client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id}, run_name="baseline")
    return uri


@pytest.mark.parametrize("sig, rc", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 143)])
def test_mlflow_ui_dies_with_the_check_however_that_ends(ablation_store, tmp_path, sig, rc):
    uri = ablation_store
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ablate": {"experiment": "ablation"}, "tracking": {"uri": uri}}))
    # The check's health requests go to a closed proxy port, so it waits for the UI (up to 120 s) while uvicorn runs;
    # and PATH has no chromium, so it could not go further anyway.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent),
           "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    check = subprocess.Popen([sys.executable, "-m", "pipelines.ui_check", "--only", "mlflow", "--params", str(params),
                              "--out", str(tmp_path / "out")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
    session = None
    try:
        ui = wait_until(lambda: [pid for pid, (_, cmd) in processes().items() if "mlflow ui" in cmd and uri in cmd],
                        120)
        assert ui, "ui_check never started mlflow ui"
        session = processes()[ui[0]][0]  # mlflow ui and the uvicorn workers it starts
        assert wait_until(lambda: [c for s, c in processes().values() if s == session and "uvicorn" in c], 100)
        assert check.poll() is None
        os.kill(check.pid, sig)  # SIGKILL: no handler, no `finally` runs; SIGTERM: a clean stop
        assert check.wait(timeout=60) == rc
        left = wait_until(lambda: not [p for p, (s, _) in processes().items() if s == session], 30)
        assert left, [cmd for s, cmd in processes().values() if s == session]
    finally:
        if check.poll() is None:
            check.kill()
            check.wait()
        for pid in [p for p, (s, _) in processes().items() if session is not None and s == session]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # only after a failure
