"""Shared fixtures code for the orchestration tests: temporary git+DVC repositories and a real Prefect server.

`make_toy_repo` builds a five-stage DVC pipeline whose stages are a few lines of Python (they run in well under a
second) but do what the real ones do at the boundaries the orchestrator sees: outputs under data/, metrics in
metrics/, a model version registered in a sqlite MLflow registry with data/model/mlflow.json, and a clear error on
stderr when told to fail. The real pipeline on the tiny preset is exercised by tests/test_dvc_pipeline.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import yaml

# A private Prefect home for the whole test session, before anything imports Prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="groupvit-prefect-home-")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TOY_STAGE = textwrap.dedent('''
    """A toy stage: python toy.py <stage>. Reads params.yaml section <stage>, writes its outputs and metrics."""
    import json, sys, time
    from pathlib import Path

    import yaml

    stage = sys.argv[1]
    params = yaml.safe_load(open("params.yaml"))
    cfg = params.get(stage) or {}
    if cfg.get("fail"):
        sys.exit(f"boom: the {stage} stage was told to fail (toy error for the tests)")
    time.sleep(cfg.get("sleep", 0))
    Path("metrics").mkdir(exist_ok=True)
    out = Path("data") / stage
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"stage": stage}
    if stage == "train":
        from groupvit.config import load_section
        from pipelines.tracking import TrackingConfig, resolve_uri
        import mlflow

        tracking = load_section(TrackingConfig, "params.yaml", "tracking", required=False)
        client = mlflow.MlflowClient(resolve_uri(tracking))
        exp = client.get_experiment_by_name(tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(tracking.experiment)
        run = client.create_run(exp_id, run_name="train")
        client.log_metric(run.info.run_id, "loss", 1.0 - cfg["quality"])
        client.set_terminated(run.info.run_id)
        try:
            client.create_registered_model(tracking.registered_model)
        except mlflow.exceptions.MlflowException:
            pass
        version = client.create_model_version(tracking.registered_model, f"runs:/{run.info.run_id}/model",
                                              run_id=run.info.run_id).version
        Path("data/model").mkdir(parents=True, exist_ok=True)
        Path("data/model/quality.txt").write_text(str(cfg["quality"]))
        Path("data/model/model.safetensors").write_text(f"weights of quality {cfg['quality']}")
        from pipelines.tracking import write_model_record
        write_model_record("data/model", {"name": tracking.registered_model, "version": int(version),
                                          "run_id": run.info.run_id})
        metrics["loss"] = 1.0 - cfg["quality"]
    if stage == "evaluate":
        metrics["miou"] = float(Path("data/model/quality.txt").read_text())
    (out / "done.txt").write_text(json.dumps(cfg, sort_keys=True))
    Path(f"metrics/{stage}.json").write_text(json.dumps(metrics))
    print(f"{stage}: wrote {out} and metrics/{stage}.json")
''')

TOY_DEPS = {"synth": [], "download": ["data/synth"], "nouns": ["data/download"], "train": ["data/nouns"],
            "evaluate": ["data/model"]}


def toy_dvc_yaml(stages: tuple[str, ...] = tuple(TOY_DEPS)) -> dict[str, Any]:
    spec = {}
    for stage in stages:
        deps = [d for d in TOY_DEPS[stage] if d.removeprefix("data/") in stages or d == "data/model"]
        outs = ["data/model", "data/train"] if stage == "train" else [f"data/{stage}"]
        spec[stage] = {"cmd": f"{sys.executable} toy.py {stage}", "deps": ["toy.py", *deps], "params": [stage],
                       "outs": outs, "metrics": [{f"metrics/{stage}.json": {"cache": False}}]}
    return {"stages": spec}


def toy_params(**sections: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {stage: {"n": 1} for stage in TOY_DEPS}
    params["train"] = {"quality": 0.5}
    params["tracking"] = {"experiment": "toy", "registered_model": "toy-model"}
    params["prefect"] = {"retries": 0, "retry_delay_seconds": 0, "lock_timeout_seconds": 60,
                         "promote_metric": "evaluate.json:miou"}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return params


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=check, capture_output=True, text=True,
                          env=env)


def init_repo(repo: Path) -> None:
    """`git init` + `dvc init` + a first commit of what is in `repo`."""
    git(repo, "init", "-q", "-b", "main")
    dvc(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "initial")


_MLFLOW_DB: list[Path] = []


def empty_mlflow_db() -> Path:
    """An initialised, empty sqlite MLflow store, created once per session (its migrations take seconds)."""
    if not _MLFLOW_DB:
        import mlflow

        path = Path(tempfile.mkdtemp(prefix="groupvit-mlflow-")) / "mlflow.db"
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
        _MLFLOW_DB.append(path)
    return _MLFLOW_DB[0]


def make_toy_repo(repo: Path, params: dict[str, Any] | None = None,
                  stages: tuple[str, ...] = tuple(TOY_DEPS)) -> Path:
    """A git+DVC repository running the toy `stages` (in pipeline order), with an empty MLflow store."""
    import shutil

    repo.mkdir(parents=True, exist_ok=True)
    (repo / "toy.py").write_text(TOY_STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(toy_dvc_yaml(stages), sort_keys=False))
    shutil.copy(empty_mlflow_db(), repo / "mlflow.db")
    write_params(repo, params or toy_params())
    (repo / ".gitignore").write_text("/mlflow.db\n/mlartifacts/\n")
    init_repo(repo)
    return repo


def write_params(repo: Path, params: dict[str, Any]) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


# The project's own pipeline, shrunk to seconds: a 64-image world, two shards, a few training steps.
TINY_OVERRIDES = {
    "synth": {"preset": "tiny", "workers": 1},
    "download": {"processes_count": 1, "thread_count": 4, "number_sample_per_shard": 32},
    "nouns": {"n_process": 1},
    "data": {"image_size": 32, "num_workers": 0, "shuffle_buffer": 16},
    "model": {"image_size": 32},
    "train": {"steps": 2, "batch_size": 8, "lr_base_batch": 8, "warmup_steps": 1, "precision": "fp32",
              "log_every": 1, "ckpt_every": 2, "threads": 1, "nproc": 1},
    # 8 held-out images may hold no single-object image to classify: segmentation only.
    "evaluate": {"batch_size": 8, "num_pictures": 1, "threads": 1, "classification": []},
    "tracking": {"system_metrics": False},
}
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", "groupvit", "pipelines")


def tiny_params(extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The project's params.yaml with TINY_OVERRIDES (and `extra`) merged into its sections."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for overrides in (TINY_OVERRIDES, extra or {}):
        for section, values in overrides.items():
            params[section] = {**(params.get(section) or {}), **values}
    for dataset in params["evaluate"]["segmentation"]:  # 32 px images: evaluate at their own size
        dataset["short_side"] = 32
    return params


def make_project_repo(repo: Path, extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A git+DVC repository holding a copy of this project's pipeline (code, dvc.yaml) with tiny params."""
    import shutil

    repo.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, repo / name)
    write_params(repo, tiny_params(extra))
    (repo / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "data/.gitignore", repo / "data/.gitignore")
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    init_repo(repo)
    return repo


_BUILT: dict[str, Path] = {}


def built_project_repo(dest: Path) -> Path:
    """A copy (at `dest`) of a tiny project repository on which `dvc repro` already ran; built once per session."""
    import shutil

    if "repo" not in _BUILT:
        source = Path(tempfile.mkdtemp(prefix="groupvit-built-")) / "repo"
        make_project_repo(source)
        result = dvc(source, "repro", check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _BUILT["repo"] = source
        (source.parent / "repro.log").write_text(result.stdout + result.stderr)
    shutil.copytree(_BUILT["repo"], dest, symlinks=True)
    return dest


def first_repro_log() -> str:
    """What the first `dvc repro` of `built_project_repo` printed."""
    return (_BUILT["repo"].parent / "repro.log").read_text()
