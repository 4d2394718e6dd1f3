"""`make deploy` + `make worker`: the `retrain` deployment on a Prefect `process` work pool, run by workers in clones of
the repository (training machines), against a real Prefect server; a machine lost mid-run; a server that does not
answer."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from _orchestration import ROOT, empty_mlflow_db, git, make_toy_repo, toy_params, write_params  # noqa: I001

from groupvit.errors import ConfigError
from groupvit.procs import TiedProcess
from pipelines import deploy
from pipelines.deploy import resolve_target

# Heartbeats every 30 s (Prefect's minimum); a run silent for 40 s is marked Crashed by the automation.
POOL = {"work_pool": "test-pool", "deployment": "pool-retrain", "cron": "30 2 * * 3", "timezone": "Europe/Paris",
        "heartbeat_seconds": 30, "crash_after_seconds": 40}
DEPLOYMENT = f"retrain/{POOL['deployment']}"
STAGES = ("train", "evaluate")  # the toy pipeline's last two stages: a model, registered, evaluated, promoted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on a free 127.0.0.1 port (with the automation services), stopped after."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.serve import start_local_server, stop

    home, before = tmp_path_factory.mktemp("prefect-home"), os.environ["PREFECT_HOME"]
    os.environ["PREFECT_HOME"] = str(home)  # the server's own database, not the session's
    try:
        proc, api = start_local_server(_free_port())
    finally:
        os.environ["PREFECT_HOME"] = before
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield api
    finally:
        stop(proc)


def run_main(argv: list[str], api: str) -> int:
    """`python -m pipelines.deploy ...` in this process (its import of Prefect is already paid for)."""
    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api
    try:
        return deploy.main(argv)
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL")
        else:
            os.environ["PREFECT_API_URL"] = before


def clone(origin: Path, dest: Path, **sections: dict) -> Path:
    """A training machine's checkout: `git clone` of `origin`, its own empty MLflow store, params changed locally."""
    git(origin.parent, "clone", "-q", str(origin), str(dest))
    empty = empty_mlflow_db()
    (dest / "mlflow.db").write_bytes(empty.read_bytes())  # git-ignored: each machine has its own tracking store here
    if sections:
        write_params(dest, toy_params(prefect=POOL, **sections))
    return dest


def start_worker(checkout: Path, api: str, log: Path) -> TiedProcess:
    """`make worker` in `checkout` (polling every second instead of every 10 s)."""
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    return TiedProcess([sys.executable, "-m", "pipelines.deploy", "worker"], cwd=checkout, env=env,
                       stdout=log.open("w"), stderr=subprocess.STDOUT)


def started_by(worker: TiedProcess) -> list[psutil.Process]:
    """The worker and everything under it (flow runs included, in sessions of their own); not its watchdog."""
    try:
        return psutil.Process(worker.pid).children(recursive=True)
    except psutil.Error:
        return []


def kill_tree(procs: list[psutil.Process]) -> None:
    """SIGKILL every process at once, as a power cut would: freeze them first (so none reacts), then kill."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=30)


def stop_worker(worker: TiedProcess) -> int:
    """Ctrl-C the worker; whatever it started in sessions of their own (flow runs) is killed too, never left over."""
    tree = started_by(worker)
    try:
        return worker.stop(signal.SIGINT, timeout=60)
    finally:
        kill_tree([p for p in tree if p.is_running()])


def wait_for(predicate, timeout: float, worker: TiedProcess | None, log: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if worker is not None and worker.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}:\n{log.read_text()[-3000:]}")


def read_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def final_state(flow_run_id, timeout: float, worker: TiedProcess | None, log: Path):
    return wait_for(lambda: (s := read_run(flow_run_id).state) and s.is_final() and s, timeout, worker, log,
                    "the flow run's final state")


def artifacts_of(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found}


def trigger():
    """A run of the deployment now, through the API (as the UI's Run button does)."""
    from prefect.deployments import run_deployment

    return run_deployment(DEPLOYMENT, timeout=0).id


def runs_stage(worker: TiedProcess, checkout: Path) -> bool:
    """Whether the train stage's own process (dvc repro -> `python toy.py train`) runs under the worker."""
    for proc in started_by(worker):
        try:
            if proc.cmdline()[-2:] == ["toy.py", "train"] and Path(proc.cwd()) == checkout:
                return True
        except psutil.Error:  # a process ended while we looked
            pass
    return False


def locked_stages(repo: Path) -> set[str]:
    lock = repo / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.exists() else set()


@pytest.mark.slow
def test_workers_in_clones_run_the_deployed_retrain_and_a_lost_machine_crashes_its_run(server, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    origin = make_toy_repo(tmp_path / "origin", toy_params(prefect=POOL), stages=STAGES)
    (origin / "pipelines").symlink_to(ROOT / "pipelines")  # the flow code (`pipelines/flows.py:retrain`)
    git(origin, "add", "pipelines")
    git(origin, "commit", "-qm", "flow code")
    # `make deploy`, once, from any checkout: the pool, the deployment on its cron schedule, the lost-run automation.
    assert run_main(["--params", str(origin / "params.yaml")], server) == 0
    assert f"created work pool 'test-pool' (process) on {server}" in capsys.readouterr().out
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("test-pool").type == "process"
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        (schedule,) = client.read_deployment_schedules(deployment.id)
        (automation,) = client.read_automations_by_name("pool-retrain: crash runs without heartbeat")
    assert deployment.work_pool_name == "test-pool" and deployment.entrypoint == "pipelines/flows.py:retrain"
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("30 2 * * 3", "Europe/Paris", True)
    assert deployment.parameters == {"workdir": ".", "params_file": "params.yaml"}  # in the worker's checkout
    assert deployment.job_variables == {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}} and automation.enabled

    # A worker for a pool nobody deployed: a one-line error, no worker.
    lost = clone(origin, tmp_path / "machine1", train={"quality": 0.5, "sleep": 600})  # a train stage to cut off
    (lost / "other.yaml").write_text(yaml.safe_dump(toy_params(prefect={**POOL, "work_pool": "nobody"})))
    assert run_main(["worker", "--params", str(lost / "other.yaml")], server) == 2
    assert capsys.readouterr().err.startswith("error: work pool 'nobody' (prefect.work_pool) does not exist on")
    (lost / "other.yaml").unlink()

    # 1. Machine 1 is lost mid-run: every process of its worker's tree (the flow run's session included) SIGKILLed at
    #    once, so nothing reports. Its heartbeats stop; the automation marks the run Crashed (checked at the end).
    log1 = tmp_path / "worker1.log"
    worker = start_worker(lost, server, log1)
    try:
        lost_run = trigger()
        wait_for(lambda: runs_stage(worker, lost), 180, worker, log1, "machine 1's train stage")
        kill_tree(started_by(worker))
        worker.wait(timeout=30)
    finally:
        stop_worker(worker)
    assert read_run(lost_run).state.is_running()  # Prefect alone would show it Running for ever

    # 2. Machine 2 picks up a run created through the API and completes it in its own checkout.
    machine = clone(origin, tmp_path / "machine2")
    log2 = tmp_path / "worker2.log"
    worker = start_worker(machine, server, log2)
    try:
        flow_run_id = trigger()
        state = final_state(flow_run_id, 240, worker, log2)
        assert state.is_completed(), f"{state.name}: {state.message}\n{log2.read_text()[-3000:]}"
    finally:
        rc = stop_worker(worker)
    assert rc == 0, log2.read_text()[-3000:]  # Ctrl-C stops the worker cleanly
    assert read_run(flow_run_id).work_pool_name == "test-pool"
    arts = artifacts_of(flow_run_id)
    assert {"stage-train", "stage-evaluate", "retrain-metrics", "retrain-summary", "promotion"} <= set(arts)
    assert "evaluate.json:miou" in arts["stage-evaluate"] and "no champion yet" in arts["promotion"]
    assert locked_stages(machine) == set(STAGES) and (machine / "data/model/model.safetensors").is_file()
    assert not (origin / "dvc.lock").exists() and git(origin, "status", "--porcelain").strip() == ""

    # Back to machine 1: Crashed with the reason, nothing recorded, nothing promoted or summarised.
    state = final_state(lost_run, POOL["crash_after_seconds"] + 90, None, log1)
    assert state.is_crashed() and "no heartbeat from this flow run for 40 s" in state.message, state.message
    assert locked_stages(lost) == set() and not (lost / "data/model").exists()
    assert not {"promotion", "retrain-summary", "retrain-metrics"} & set(artifacts_of(lost_run))


def test_deploy_and_worker_stop_before_any_work_when_the_server_does_not_answer(tmp_path, capsys):
    repo = make_toy_repo(tmp_path / "repo", toy_params(prefect=POOL), stages=STAGES)
    (repo / "pipelines").symlink_to(ROOT / "pipelines")
    api = f"http://127.0.0.1:{_free_port()}/api"  # nothing listens there
    capsys.readouterr()  # the toy repo's set-up may log (MLflow creating the shared empty database)
    for action in ([], ["worker"]):
        assert run_main([*action, "--params", str(repo / "params.yaml")], api) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: no Prefect server answers at {api} (PREFECT_API_URL): start one (`.venv/bin/prefect server "
            "start`) or point PREFECT_API_URL at yours"]
    assert git(repo, "status", "--porcelain") == "?? pipelines\n"  # nothing else written


def test_the_lost_run_window_must_exceed_the_heartbeat(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prefect": {"heartbeat_seconds": 60, "crash_after_seconds": 60}}))
    with pytest.raises(ConfigError, match="crash_after_seconds=60 must be larger than prefect.heartbeat_seconds=60"):
        resolve_target(params)
