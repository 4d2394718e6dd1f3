"""The Prefect flows against a real (temporary) Prefect server and real git+DVC repositories with toy stages."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from _orchestration import ROOT, dvc, git, make_toy_repo, toy_params, write_params  # noqa: I001 (sets PREFECT_HOME)
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pipelines.flows import retrain
from pipelines.promotion import promote_if_better
from pipelines.workspace import WorkspaceBusy, workspace_lock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def artifacts_of(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found}


def task_runs_of(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def champion(repo: Path) -> str | None:
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    try:
        return str(client.get_model_version_by_alias("toy-model", "champion").version)
    except mlflow.exceptions.MlflowException:
        return None


def lock_hashes(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_retrain_runs_every_stage_reports_and_promotes_only_a_better_model(prefect_api, tmp_path):
    repo = make_toy_repo(tmp_path / "repo")
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    first = state.result()
    assert [s["stage"] for s in first["stages"]] == ["synth", "download", "nouns", "train", "evaluate"]
    assert all(s["ran"] for s in first["stages"])
    assert first["promotion"]["promoted"] and champion(repo) == "1"

    # Read back through the API: one artifact per stage with its figures, the summary and the decision.
    arts = artifacts_of(state.state_details.flow_run_id)
    assert {"stage-synth", "stage-download", "stage-nouns", "stage-train", "stage-evaluate", "retrain-metrics",
            "retrain-summary", "promotion"} <= set(arts)
    assert "evaluate.json:miou" in arts["stage-evaluate"] and "0.5" in arts["stage-evaluate"]
    assert "no champion yet" in arts["promotion"]
    # DVC stays the record of versions: the lock has the new hashes and nothing is stale.
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    before = lock_hashes(repo)

    # A worse model: train and evaluate rerun (upstream skipped), a new version is registered but not promoted.
    write_params(repo, toy_params(train={"quality": 0.25}))
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    second = state.result()
    assert {s["stage"]: s["ran"] for s in second["stages"]} == {
        "synth": False, "download": False, "nouns": False, "train": True, "evaluate": True}
    decision = second["promotion"]
    assert (decision["promoted"], decision["version"], decision["champion_version"]) == (False, "2", "1")
    assert "does not beat" in decision["reason"] and champion(repo) == "1"
    after = lock_hashes(repo)
    assert after["data/model"] != before["data/model"] and after["data/synth"] == before["data/synth"]
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
    assert "does not beat" in artifacts_of(state.state_details.flow_run_id)["retrain-summary"]


def test_failing_stage_exhausts_retries_fails_the_flow_and_never_promotes(prefect_api, tmp_path):
    params = toy_params(train={"quality": 0.9}, evaluate={"fail": True},
                        prefect={"retries": 1, "retry_delay_seconds": 0, "lock_timeout_seconds": 60})
    repo = make_toy_repo(tmp_path / "repo", params, stages=("train", "evaluate"))
    state = retrain(workdir=str(repo), return_state=True)
    assert state.is_failed()
    assert "boom: the evaluate stage was told to fail" in state.message  # the stage's own error, in the flow state
    runs = {r.name: r for r in task_runs_of(state.state_details.flow_run_id)}
    assert runs["dvc repro evaluate"].state.is_failed() and runs["dvc repro evaluate"].run_count == 2  # 1 + 1 retry
    assert runs["dvc repro train"].state.is_completed()
    assert not any(name.startswith("promote") for name in runs)
    # The new model was registered by train, but a failed retrain leaves the registry's champion alone.
    assert champion(repo) is None


def hold_workspace(repo: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process (an overlapping run) holding the workspace lock for `seconds`; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pipelines.workspace import workspace_lock\n"
        "with workspace_lock(sys.argv[1], 5, owner='(other retrain)'):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[2]))"), str(repo), str(seconds)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "held"
    return holder


def flow_logs(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_overlapping_retrain_fails_clearly_or_waits_for_the_workspace(prefect_api, tmp_path):
    repo = make_toy_repo(tmp_path / "repo", toy_params(prefect={"lock_timeout_seconds": 1, "retries": 0}),
                         stages=("synth",))
    holder = hold_workspace(repo, 30)
    try:
        state = retrain(workdir=str(repo), return_state=True)
        assert state.is_failed()
        assert "DVC workspace is busy" in state.message and "(other retrain)" in state.message
        assert not (repo / "dvc.lock").exists()  # the second run touched nothing
    finally:
        holder.kill()
        holder.wait()

    # With a longer allowance the second run waits for the first, then completes (and commits the new versions).
    write_params(repo, toy_params(prefect={"lock_timeout_seconds": 120, "retries": 0, "commit": True}))
    git(repo, "commit", "-qam", "params: wait longer, commit versions")
    holder = hold_workspace(repo, 3)
    try:
        state = retrain(workdir=str(repo), promote_model=False, return_state=True)
        assert state.is_completed(), state.message
        assert "waiting for the DVC workspace: pid" in flow_logs(state.state_details.flow_run_id)
        assert "Data and pipelines are up to date" in dvc(repo, "status").stdout
        assert state.result()["commit"] == git(repo, "rev-parse", "HEAD").strip()
        assert git(repo, "status", "--porcelain", "dvc.lock", "metrics").strip() == ""  # recorded in git
    finally:
        holder.kill()
        holder.wait()


def test_workspace_lock_is_exclusive_and_released(tmp_path):
    with workspace_lock(tmp_path, timeout=0):
        with pytest.raises(WorkspaceBusy, match="busy"):
            with workspace_lock(tmp_path, timeout=0.2, poll=0.05):
                pass
    with workspace_lock(tmp_path, timeout=0):  # released on exit
        pass


def test_promotion_needs_a_strictly_better_miou(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    versions = [str(client.create_model_version("m", "file:///nowhere").version) for _ in range(4)]
    assert promote_if_better(client, "m", versions[0], 0.30).promoted
    tie = promote_if_better(client, "m", versions[1], 0.30)
    assert not tie.promoted and tie.champion_version == versions[0]
    better = promote_if_better(client, "m", versions[2], 0.31)
    assert better.promoted and "beats the previous champion v1" in better.reason
    assert not promote_if_better(client, "m", versions[3], 0.10).promoted
    assert str(client.get_model_version_by_alias("m", "champion").version) == versions[2]
    assert client.get_model_version("m", versions[3]).tags["miou"] == "0.1"


def test_serve_registers_the_cron_deployment_and_keeps_it_scheduled(prefect_api, tmp_path):
    repo = make_toy_repo(tmp_path / "repo", toy_params(prefect={"cron": "15 4 * * 2", "timezone": "Europe/Paris",
                                                                 "deployment": "nightly"}), stages=("synth",))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    # Output goes to a file, not a pipe: nobody drains a pipe while we poll the API, and a full pipe blocks the
    # runner's logging so it can never finish shutting down after SIGINT.
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "pipelines.serve", "--no-server", "--params",
                              str(repo / "params.yaml")], cwd=ROOT, env=env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, text=True)
    try:
        deployment = ablation = None
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while ablation is None and time.monotonic() < deadline and serve.poll() is None:
                try:  # serve registers retrain, then ablation
                    deployment = client.read_deployment_by_name("retrain/nightly")
                    ablation = client.read_deployment_by_name("ablation/groupvit-ablation")
                except Exception:  # noqa: BLE001 (not registered yet)
                    time.sleep(1)
            assert ablation is not None, log.read_text() if serve.poll() is not None else "serve timed out"
            (schedule,) = client.read_deployment_schedules(deployment.id)
            assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
                "15 4 * * 2", "Europe/Paris", True)
            assert deployment.parameters == {"workdir": str(repo.resolve()), "params_file": "params.yaml"}
            assert ablation.parameters["workdir"] == str(repo.resolve()) and not ablation.schedules
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # Seen once in a full-suite run on 2 cores: Prefect's runner ignored the first SIGINT for over 60 s
                # (cause not found; never reproduced alone). What matters here is the schedule after the runner
                # stops, so stop it the way a process manager would, and say so if even that fails.
                serve.send_signal(signal.SIGTERM)
                try:
                    serve.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"serve ignored SIGINT and SIGTERM:\n{log.read_text()[-3000:]}") from None
            # pause_on_shutdown=False: stopping the runner keeps the schedule (and its upcoming runs) active.
            (schedule,) = client.read_deployment_schedules(deployment.id)
            assert schedule.active
    finally:
        serve.kill()
        serve.wait()
