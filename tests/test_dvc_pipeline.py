"""The real DVC pipeline (dvc.yaml + the project's stages) on the tiny preset, in a temporary git repository."""
from __future__ import annotations

import json

import pytest
import yaml
from _orchestration import built_project_repo, dvc, first_repro_log

pytestmark = pytest.mark.slow

ALL_STAGES = ["synth", "download", "nouns", "train", "train_baseline", "evaluate"]


def ran(output: str) -> list[str]:
    return [s for s in ALL_STAGES if f"Running stage '{s}'" in output]


def test_repro_builds_every_stage_then_reruns_nothing(tmp_path):
    repo = built_project_repo(tmp_path / "repo")
    assert ran(first_repro_log()) == ALL_STAGES
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(ALL_STAGES)
    # Each stage records only the params keys it reads (nouns does not depend on train, etc.).
    assert set(lock["nouns"]["params"]["params.yaml"]) == {"nouns"}
    assert set(lock["train"]["params"]["params.yaml"]) == {"base.seed", "model", "data", "train", "tracking"}
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert 0 <= metrics["synth_test"]["groupvit"]["miou"] <= 100
    assert (repo / "metrics/train_loss.csv").read_text().startswith("step,loss")
    assert json.loads((repo / "data/model/mlflow.json").read_text())["version"] == 1

    # The machine-local MLflow record is outside the model folder's hash: another run id or path changes no lock.
    record = repo / "data/model/mlflow.json"
    record.write_text(record.read_text().replace(json.loads(record.read_text())["run_id"], "0" * 32))
    again = dvc(repo, "repro")
    assert ran(again.stdout) == [] and again.stdout.count("didn't change, skipping") == len(ALL_STAGES)
    assert "Data and pipelines are up to date" in dvc(repo, "status").stdout


def test_exp_run_with_a_train_param_reruns_only_the_training_stages_and_evaluate(tmp_path):
    repo = built_project_repo(tmp_path / "repo")
    before = json.loads((repo / "metrics/train.json").read_text())
    result = dvc(repo, "exp", "run", "-n", "three-steps", "-S", "train.steps=3")
    # The baseline trains with the same `train` recipe, so it reruns too; the data stages do not.
    assert ran(result.stdout) == ["train", "train_baseline", "evaluate"], result.stdout[-2000:]
    assert json.loads((repo / "metrics/train.json").read_text())["steps"] == 3 != before["steps"]
    assert "three-steps" in dvc(repo, "exp", "list", "--name-only").stdout.split()
    params = dvc(repo, "exp", "show", "--csv", "--no-pager").stdout
    assert "three-steps" in params and "train.steps" in params
