"""Prefect flows over the DVC pipeline: one flow per stage, `retrain` chaining them, and `ablation`.

DVC owns the DAG, the caching and the record of versions (`dvc.lock`); Prefect schedules, retries, logs and reports.
Each stage is a task that runs `dvc repro <stage>` in a subprocess (never cached by Prefect: DVC decides what is
stale), streams its output into the Prefect logs and publishes the stage's metrics as an artifact. A file lock around
the workspace makes overlapping runs wait (or fail clearly after `prefect.lock_timeout_seconds`).

    .venv/bin/python -m pipelines.flows retrain          # one retrain now, against a temporary local Prefect server
    .venv/bin/python -m pipelines.serve                   # the scheduled deployment (see README)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

# Without PREFECT_API_URL a flow run starts a temporary local server; its 20 s default is short on a busy 2-core box.
# Prefect reads its settings when imported, hence before the import.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow, get_run_logger, task  # noqa: E402 (after the setting above)
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from groupvit.config import load_section
from groupvit.errors import DataError
from pipelines import ablation as ablation_lib
from pipelines.config import OrchestrationConfig
from pipelines.promotion import Decision, promote_if_better
from pipelines.remotes import Remote, check_remote, push_target
from pipelines.remotes import push as dvc_push
from pipelines.tracking import MODEL_RECORD, TrackingConfig, check_reachable, read_model_record, resolve_uri
from pipelines.workspace import load_dvc_yaml, read_metric, run_streaming, stage_metrics, tool_env, workspace_lock


class StageFailed(RuntimeError):
    """`dvc repro <stage>` exited non-zero; the message ends with the stage's last output lines."""


class PushFailed(RuntimeError):
    """`dvc push` exited non-zero; the message ends with its last output lines."""


def _key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "-".join(parts).lower().replace("_", "-")


def _config(workdir: Path, params_file: str) -> OrchestrationConfig:
    return load_section(OrchestrationConfig, workdir / params_file, "prefect", required=False)


def _markdown_table(rows: dict[str, Any]) -> str:
    if not rows:
        return "_no metrics declared for this stage_\n"
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| `{k}` | {v:.6g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, workdir: str) -> dict[str, Any]:
    """Run `dvc repro <stage>` (DVC reruns it only when its deps or params changed) and publish its metrics."""
    logger = get_run_logger()
    ran = False

    def log(line: str) -> None:
        nonlocal ran
        ran = ran or line.startswith(f"Running stage '{stage}'")
        logger.info(line)

    result = run_streaming([sys.executable, "-m", "dvc", "repro", stage], workdir, log)
    if result.returncode != 0:
        raise StageFailed(f"stage {stage!r}: `dvc repro {stage}` exited with {result.returncode} in {workdir}; "
                          f"last output:\n{result.tail}")
    metrics = stage_metrics(workdir, stage)
    verb = f"ran in {result.seconds:.1f} s" if ran else "was up to date (DVC skipped it)"
    create_markdown_artifact(key=_key("stage", stage), markdown=f"## `{stage}` {verb}\n\n{_markdown_table(metrics)}",
                             description=f"DVC stage {stage}: metrics after this run")
    logger.info("stage %s %s; %d metrics", stage, verb, len(metrics))
    return {"stage": stage, "ran": ran, "seconds": round(result.seconds, 2), "metrics": metrics}


def _trained_model(workdir: Path) -> tuple[str, str]:
    """(registered model name, version) that the train stage recorded for the weights now in data/model."""
    try:
        info = read_model_record(workdir / "data/model")
    except DataError as e:
        raise StageFailed(str(e)) from None
    path = workdir / "data/model" / MODEL_RECORD
    if info is None:
        raise StageFailed(f"{path} not found: the train stage records the registered model version there")
    try:
        return str(info["name"]), str(info["version"])
    except KeyError as e:
        raise StageFailed(f"{path}: missing key {e} (expected the registered model's name and version)") from None


@task(name="promote", cache_policy=NO_CACHE)
def promote(workdir: str, params_file: str, cfg: OrchestrationConfig) -> dict[str, Any]:
    """Move the `champion` alias to the new model version only when its mIoU beats the champion's."""
    import mlflow

    logger = get_run_logger()
    wd = Path(workdir)
    tracking = load_section(TrackingConfig, wd / params_file, "tracking", required=False)
    if not tracking.registered_model:
        logger.info("tracking.registered_model is empty: nothing registered, nothing to promote")
        return {"promoted": False, "reason": "no registered model (tracking.registered_model is empty)"}
    model, version = _trained_model(wd)
    miou = read_metric(wd, cfg.promote_metric)
    client = mlflow.MlflowClient(resolve_uri(tracking, root=wd))
    decision: Decision = promote_if_better(client, model, version, miou, cfg.champion_alias)
    logger.info(decision.reason)
    create_markdown_artifact(key="promotion", markdown=f"## Promotion\n\n{decision.reason}\n",
                             description=f"{model}@{cfg.champion_alias}: {'promoted' if decision.promoted else 'kept'}")
    return decision.as_dict()


@task(name="dvc-push", task_run_name="dvc push -r {remote_name}", cache_policy=NO_CACHE)
def push_versions(workdir: str, remote_name: str, remote_url: str) -> dict[str, Any]:
    """Publish what dvc.lock records (data, models, evaluation outputs) to the DVC remote, for `dvc pull` elsewhere."""
    logger = get_run_logger()
    remote = Remote(remote_name, remote_url)
    result = dvc_push(workdir, remote, logger.info)
    if result.returncode != 0:
        raise PushFailed(f"`dvc push -r {remote.name}` to {remote.url} exited with {result.returncode} in {workdir}; "
                         f"nothing was promoted or committed; last output:\n{result.tail}")
    create_markdown_artifact(key="dvc-push", markdown=f"## Pushed to `{remote.name}`\n\n{remote.url}, "
                             f"{result.seconds:.1f} s\n\n```\n{result.tail}\n```\n",
                             description=f"dvc push to the DVC remote {remote.name}")
    return {"remote": remote.name, "url": remote.url, "seconds": round(result.seconds, 2)}


def preflight(wd: Path, params_file: str, cfg: OrchestrationConfig) -> Remote | None:
    """Check, before any work, that the MLflow tracking store and the DVC remote `retrain` will use are reachable.

    Returns:
        The remote to push to after the stages (params `prefect.push`), None for none.

    Raises:
        ConfigError: one of them is not reachable (the message names it); nothing in the workspace has changed.
    """
    tracking = load_section(TrackingConfig, wd / params_file, "tracking", required=False)
    check_reachable(resolve_uri(tracking, root=wd))
    remote = push_target(wd, cfg.push)
    if remote is not None:
        check_remote(wd, remote)
    return remote


@task(name="git-commit", cache_policy=NO_CACHE)
def commit_versions(workdir: str, message: str) -> str:
    """Record the new versions in git: dvc.lock and the metrics (the data itself stays in the DVC cache)."""
    paths = [p for p in ("dvc.lock", "metrics") if (Path(workdir) / p).exists()]
    subprocess.run(["git", "add", "--", *paths], cwd=workdir, check=True, env=tool_env())
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=workdir, env=tool_env())
    if staged.returncode == 0:
        return "nothing to commit"
    subprocess.run(["git", "-c", "user.name=groupvit-retrain", "-c", "user.email=groupvit@localhost", "commit", "-qm",
                    message], cwd=workdir, check=True, env=tool_env())
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=workdir, capture_output=True, text=True).stdout.strip()


def _stage_task(cfg: OrchestrationConfig):
    """The stage task with the retry policy of params `prefect:`."""
    return repro_stage.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)


def _workspace(workdir: Path, cfg: OrchestrationConfig):
    """Hold the DVC workspace for this flow run; waiting is logged, giving up fails the run with WorkspaceBusy."""
    return workspace_lock(workdir, cfg.lock_timeout_seconds, on_wait=get_run_logger().warning,
                          owner=f"(flow run {flow_run.name})")


def _stage_flow(stage: str, workdir: str, params_file: str) -> dict[str, Any]:
    wd = Path(workdir).resolve()
    cfg = _config(wd, params_file)
    with _workspace(wd, cfg):
        return _stage_task(cfg)(stage, str(wd))


@flow(name="synth", log_prints=True)
def synth(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """DVC stage `synth`: the embedded synthetic captioned-scene world."""
    return _stage_flow("synth", workdir, params_file)


@flow(name="download", log_prints=True)
def download(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """DVC stage `download`: url list -> webdataset shards with img2dataset."""
    return _stage_flow("download", workdir, params_file)


@flow(name="nouns", log_prints=True)
def nouns(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """DVC stage `nouns`: spaCy candidate words per sample."""
    return _stage_flow("nouns", workdir, params_file)


@flow(name="train", log_prints=True)
def train(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """DVC stage `train`: GroupViT training (torchrun when more than one process)."""
    return _stage_flow("train", workdir, params_file)


@flow(name="evaluate", log_prints=True)
def evaluate(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """DVC stage `evaluate`: zero-shot segmentation mIoU."""
    return _stage_flow("evaluate", workdir, params_file)


def pipeline_stages(workdir: Path) -> list[str]:
    """The stages `retrain` runs, in dvc.yaml order (synth, download, nouns, train, train_baseline, evaluate)."""
    return list(load_dvc_yaml(workdir)["stages"])


@flow(name="retrain", log_prints=True)
def retrain(workdir: str = ".", params_file: str = "params.yaml", promote_model: bool = True) -> dict[str, Any]:
    """Rebuild the pipeline stage by stage with DVC, push the new versions to the DVC remote (when one is configured,
    params `prefect.push`), then promote the model if it beats the champion.

    The tracking store and the remote are checked before any stage runs; promotion and the git commit come only
    after every stage and the push succeeded, so a failed run publishes nothing half-done.

    Args:
        workdir: the DVC repository (a git checkout of this project).
        params_file: params file inside `workdir`.
        promote_model: compare with the MLflow `champion` and move the alias when the new model is better.
    """
    wd = Path(workdir).resolve()
    cfg = _config(wd, params_file)
    with _workspace(wd, cfg):
        remote = preflight(wd, params_file, cfg)
        reports = [_stage_task(cfg)(stage, str(wd)) for stage in pipeline_stages(wd)]
        pushed = None
        if remote is not None:  # after every stage: a failed one raises above and nothing is pushed
            pushed = push_versions.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)(
                str(wd), remote.name, remote.url)
        # Promotion runs only after every stage (and the push) succeeded: a failure raises above, nothing is promoted.
        decision = promote(str(wd), params_file, cfg) if promote_model else None
        commit = commit_versions(str(wd), f"retrain {flow_run.name}: dvc.lock and metrics") if cfg.commit else None
    rows = [{"stage": r["stage"], "ran": r["ran"], "seconds": r["seconds"], "metric": k, "value": v}
            for r in reports for k, v in (r["metrics"] or {"-": None}).items()]
    create_table_artifact(key="retrain-metrics", table=rows, description="dvc metrics after this retrain, per stage")
    summary = "\n".join(f"- `{r['stage']}`: {'ran' if r['ran'] else 'up to date'} ({r['seconds']} s)" for r in reports)
    verdict = decision["reason"] if decision else "promotion disabled for this run"
    where = f"pushed to DVC remote `{pushed['remote']}` ({pushed['url']})" if pushed else "not pushed (no DVC remote)"
    create_markdown_artifact(key="retrain-summary", markdown=f"## Retrain\n\n{summary}\n\n**Versions:** {where}\n\n"
                             f"**Model:** {verdict}\n", description="stages run, the push and the promotion decision")
    return {"stages": reports, "push": pushed, "promotion": decision, "commit": commit}


@task(name="ablation-job", task_run_name="job {job.name}", cache_policy=NO_CACHE)
def run_job(runner: ablation_lib.AblationRunner, job: ablation_lib.Job) -> dict[str, Any]:
    """Train and evaluate one variant at one seed in its own folder, logged as an MLflow child run (skipped when it
    finished before with the same key)."""
    logger = get_run_logger()
    return runner.run_job(job, on_line=logger.info)


@flow(name="ablation", log_prints=True)
def ablation(workdir: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """The ablation study (`ablate:` in params.yaml): one MLflow parent run, one child run per variant and seed;
    a rerun continues the study."""
    wd = Path(workdir).resolve()
    cfg = _config(wd, params_file)
    with _workspace(wd, cfg):
        with ablation_lib.AblationRunner.open(wd, params_file) as runner:
            results = [run_job(runner, j) for j in runner.jobs]
            summary = runner.finish(results)
    create_markdown_artifact(key="ablation-summary", markdown=summary["markdown"],
                             description=f"MLflow parent run {summary['parent_run_id']}")
    return summary


FLOWS = {f.name: f for f in (synth, download, nouns, train, evaluate, retrain, ablation)}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "retrain"
    if name not in FLOWS:
        sys.exit(f"usage: python -m pipelines.flows [{'|'.join(FLOWS)}] [workdir]")
    FLOWS[name](workdir=sys.argv[2] if len(sys.argv) > 2 else ".")
