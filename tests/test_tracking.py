"""The MLflow record the train stage leaves beside the weights, and what its readers do with a stale one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from groupvit.errors import DataError
from pipelines.tracking import read_model_record, write_model_record


def weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(content)
    return folder


def test_record_belongs_to_the_weights_it_was_written_for(tmp_path):
    model = weights(tmp_path / "model", b"weights v5")
    assert read_model_record(model) is None  # nothing recorded yet
    write_model_record(model, {"name": "groupvit", "version": 5})
    assert read_model_record(model)["version"] == 5

    weights(model, b"weights v3")  # what `dvc checkout` of older weights leaves: the ignored record stays
    with pytest.raises(DataError, match=r"mlflow.json describes other weights than .*model.safetensors"):
        read_model_record(model)
    (model / "model.safetensors").unlink()
    with pytest.raises(DataError, match="describes other weights"):
        read_model_record(model)


@pytest.mark.parametrize("text, expected", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object")])
def test_broken_record_names_the_file(tmp_path, text, expected):
    model = weights(tmp_path / "model", b"w")
    (model / "mlflow.json").write_text(text)
    with pytest.raises(DataError, match=rf"model/mlflow.json: {expected}"):
        read_model_record(model)


def test_promotion_refuses_a_record_of_other_weights(tmp_path):
    from pipelines.flows import StageFailed, _trained_model

    model = weights(tmp_path / "data/model", b"new")
    write_model_record(model, {"name": "groupvit", "version": 7})
    assert _trained_model(tmp_path) == ("groupvit", "7")
    weights(model, b"old")
    with pytest.raises(StageFailed, match="describes other weights"):
        _trained_model(tmp_path)
    (model / "mlflow.json").write_text(json.dumps({"version": 7}))
    with pytest.raises(StageFailed, match="describes other weights"):  # a record without the digest is not trusted
        _trained_model(tmp_path)


def test_dvcignore_keeps_the_records_out_of_the_model_hash(tmp_path):
    """DVC's own ignore matcher, with the project's .dvcignore, on the two records and on the weights."""
    root = Path(__file__).resolve().parents[1]
    code = f"""
import shutil, sys
from dvc.repo import Repo
shutil.copy({str(root / '.dvcignore')!r}, '.dvcignore')
Repo.init(no_scm=True)
repo = Repo('.')
ignored = lambda p: repo.dvcignore.is_ignored(repo.fs, p)
print(ignored('data/model/mlflow.json'), ignored('data/baseline_train/mlflow_run.json'),
      ignored('data/model/model.safetensors'), ignored('mlflow.json'))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].split() == ["True", "True", "False", "False"]


# ---- the train stage's run ----------------------------------------------------------------------------------------

def test_a_resumed_training_continues_its_mlflow_run_and_a_fresh_one_gets_a_new_run(tmp_path, caplog):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import RunTracker, TrackingConfig

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="t", registered_model="gv",
                         system_metrics=False)
    train = tmp_path / "train"
    first = RunTracker(cfg, train, enabled=True)
    with pytest.raises(KeyboardInterrupt):  # training killed after its first log step
        with first.run({"train.lr": 0.1}, data_paths=(), resume=False):
            first.log_metrics(2, {"loss": 3.0})
            raise KeyboardInterrupt
    assert json.loads((train / "mlflow_run.json").read_text())["run_id"] == first.run_id

    resumed = RunTracker(cfg, train, enabled=True)
    with resumed.run({"train.lr": 0.2, "train.log_every": 5}, data_paths=(), resume=True):
        resumed.log_metrics(4, {"loss": 2.0})
        model = weights(tmp_path / "model", b"w")
        curve = tmp_path / "train_loss.csv"
        curve.write_text("step,loss\n2,3\n4,2\n")
        registered = resumed.finish(model, {"final_loss": 2.0, "planned_by": "length"}, curve)
    assert resumed.run_id == first.run_id  # the same MLflow run, continued
    assert "keeps its original values of train.lr" in caplog.text
    client = MlflowClient(tracking_uri=cfg.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.1", "train.log_every": "5"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert run.data.metrics["final/final_loss"] == 2.0 and "final/planned_by" not in run.data.metrics
    assert registered["run_id"] == first.run_id and registered["model_uri"] == "models:/gv/1"
    assert {a.path for a in client.list_artifacts(first.run_id, "model")} == {"model/model.safetensors"}

    with RunTracker(cfg, train, enabled=True).run({}, data_paths=(), resume=False):  # a fresh training
        fresh = mlflow.active_run().info.run_id
    assert fresh != first.run_id
    other = TrackingConfig(uri=cfg.uri, experiment="other", registered_model="", system_metrics=False)
    with RunTracker(other, train, enabled=True).run({}, data_paths=(), resume=True):  # not the saved run's store
        assert mlflow.active_run().info.run_id not in (first.run_id, fresh)


def test_a_disabled_tracker_touches_nothing(tmp_path):
    from pipelines.tracking import RunTracker, TrackingConfig

    tracker = RunTracker(TrackingConfig(uri="http://127.0.0.1:1"), tmp_path / "train", enabled=False)  # rank > 0
    with tracker.run({"a": 1}, data_paths=(), resume=True):
        tracker.log_metrics(1, {"loss": 1.0})
    assert tracker.finish(tmp_path, {}, tmp_path / "x.csv") is None
    assert not (tmp_path / "train").exists()
