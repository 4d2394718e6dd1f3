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
