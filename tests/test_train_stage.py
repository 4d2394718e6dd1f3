"""`groupvit train` end to end: real loader on shards of the synthetic world, real model and loss, torchrun with two
gloo processes, sqlite MLflow read back through the MLflow client, a killed rank, and resumption.

The shards are written directly with webdataset from a small synthetic world (img2dataset and spaCy have their own
tests); the sidecars list each image's category names, standing in for the spaCy nouns.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import webdataset as wds
import yaml
from safetensors.torch import load_file

from groupvit.synth import CaptionStyle, WorldSpec, write_world
from pipelines.stages import train as stage

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """32 captioned 32 px scenes in 2 webdataset shards + noun sidecars."""
    root = tmp_path_factory.mktemp("world")
    write_world(root / "synth", WorldSpec(image_size=32), CaptionStyle(), seed=0,
                counts={"train": 32, "val": 0, "test": 0}, url_base="http://127.0.0.1:1")
    urls = pd.read_parquet(root / "synth/train/urls.parquet")
    labels = pd.read_parquet(root / "synth/train/labels.parquet").set_index("key")["categories"]
    (root / "shards").mkdir(), (root / "nouns").mkdir()
    for shard in range(2):
        rows = urls.iloc[shard * 16:(shard + 1) * 16]
        with wds.TarWriter(str(root / f"shards/{shard:05d}.tar"), mtime=0) as tar:
            for r in rows.itertuples():
                tar.write({"__key__": r.key, "jpg": (root / f"synth/train/images/{r.key}.jpg").read_bytes(),
                           "txt": r.caption, "json": {"url": r.url}})
        sidecar = {r.key: list(labels[r.key]) for r in rows.itertuples()}
        (root / f"nouns/{shard:05d}.json").write_text(json.dumps(sidecar))
    return root


@pytest.fixture(autouse=True)
def keep_threads():
    """The in-process stage sets torch's thread count from train.threads: restore it for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write_params(tmp: Path, world: Path, db: Path | None = None, **train) -> Path:
    params = {
        "base": {"seed": 0},
        "model": {"preset": "tiny", "image_size": 32, "context_length": 24},
        "data": {"shards_dir": str(world / "shards"), "nouns_dir": str(world / "nouns"), "image_size": 32,
                 "multi_label": 3, "shuffle_buffer": 16, "num_workers": 0, "crop_scale": [0.5, 1.0]},
        "train": {"steps": 8, "batch_size": 8, "lr": 1e-3, "warmup_lr": 1e-4, "min_lr": 1e-5, "lr_base_batch": 8,
                  "warmup_steps": 2, "precision": "fp32", "log_every": 2, "ckpt_every": 2, "threads": 1,
                  "nproc": 1, "dist_timeout_s": 60, **train},
        "tracking": {"uri": f"sqlite:///{db or tmp / 'mlflow.db'}", "experiment": "test", "registered_model": "gv-test",
                     "system_metrics": False},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage_args(tmp: Path, params: Path) -> list[str]:
    return ["--params", str(params), "--train-dir", str(tmp / "train"), "--model-dir", str(tmp / "model"),
            "--metrics-dir", str(tmp / "metrics")]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_unreachable_tracking_server_fails_before_training(tmp_path, world, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = write_params(tmp_path, world)
    rc = stage.main(stage_args(tmp_path, params) + ["--set", f"tracking.uri=http://127.0.0.1:{port}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "not reachable" in err
    assert not (tmp_path / "train").exists() and not (tmp_path / "model").exists()


def test_mismatched_image_sizes_are_a_config_error(tmp_path, world, capsys):
    params = write_params(tmp_path, world)
    assert stage.main(stage_args(tmp_path, params) + ["--set", "data.image_size=64"]) == 2
    assert "data.image_size (64) must equal the model's image_size (32" in capsys.readouterr().err


def corrupt_copy(world: Path, dst: Path, bad: set[int] | None = None) -> Path:
    """`world`'s shards and sidecars under `dst`, with the image of samples `bad` (all when None) made undecodable."""
    (dst / "shards").mkdir(parents=True), shutil.copytree(world / "nouns", dst / "nouns")
    n = 0
    for tar in sorted((world / "shards").glob("*.tar")):
        with wds.TarWriter(str(dst / "shards" / tar.name), mtime=0) as out:
            for sample in wds.WebDataset(str(tar), shardshuffle=False):
                if bad is None or n in bad:
                    sample["jpg"] = b"\xff\xd8 not a jpeg"
                out.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
                n += 1
    return dst


class DeadlinePassed(BaseException):
    """Not an Exception: the loader's skip handlers must not swallow it."""


def _expire(*_):
    raise DeadlinePassed("the stage still ran after 60 s")


def test_all_corrupt_shards_stop_the_stage_with_one_line_naming_them(tmp_path, world, capsys):
    data = corrupt_copy(world, tmp_path / "bad")
    params = write_params(tmp_path, world)
    overrides = ["--set", f"data.shards_dir={data / 'shards'}", "--set", f"data.nouns_dir={data / 'nouns'}",
                 "--set", "data.num_workers=1"]  # raised in a loader worker, re-raised in the stage's process
    old = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(60)  # a generous bound: without one the endless shard stream skips forever
    try:
        rc = stage.main(stage_args(tmp_path, params) + overrides)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "samples read in a row could not be used" in errors[0]
    assert str(data / "shards" / "0000") in errors[0] and "e.g. sample '" in errors[0]
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics/train.json").exists()


def test_a_few_corrupt_samples_are_skipped_and_counted_in_metrics(tmp_path, world):
    data = corrupt_copy(world, tmp_path / "bad", bad={3, 17})
    params = write_params(tmp_path, world, steps=4)  # 4 batches of 8 from 32 - 2 good samples: a second pass
    overrides = ["--set", f"data.shards_dir={data / 'shards'}", "--set", f"data.nouns_dir={data / 'nouns'}",
                 "--set", "data.num_workers=1", "--set", "tracking.registered_model="]
    assert stage.main(stage_args(tmp_path, params) + overrides) == 0
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["steps"] == 4 and metrics["skipped_samples"] >= 2  # counted in the worker, read by rank 0


def test_tracking_uri_precedence_checks_and_dvc_hashes(tmp_path, monkeypatch):
    from groupvit.errors import ConfigError
    from pipelines.tracking import TrackingConfig, check_reachable, dvc_data_hashes, resolve_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(TrackingConfig(), root=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5005")
    assert resolve_uri(TrackingConfig(), root=tmp_path) == "http://127.0.0.1:5005"
    assert resolve_uri(TrackingConfig(uri="sqlite:////x/y.db")) == "sqlite:////x/y.db"  # params win
    check_reachable(f"sqlite:///{tmp_path}/new/folder/mlflow.db")  # a missing folder is created
    assert (tmp_path / "new/folder").is_dir()
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ConfigError, match="not writable"):
            check_reachable(f"sqlite:///{tmp_path}/ro/mlflow.db")
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "download": {"cmd": "x", "outs": [{"path": "data/shards", "hash": "md5", "md5": "abc.dir"}]},
        "nouns": {"cmd": "y", "deps": [{"path": "data/shards", "hash": "md5", "md5": "abc.dir"}],
                  "outs": [{"path": "data/nouns", "hash": "md5", "md5": "def.dir"}]}}}))
    assert dvc_data_hashes(["data/shards", "data/nouns/", "data/other"], lock) == {"data/shards": "abc.dir",
                                                                                   "data/nouns": "def.dir"}
    assert dvc_data_hashes(["data/shards"], tmp_path / "missing.lock") == {}


@pytest.mark.slow
def test_training_on_the_synthetic_world_lowers_the_loss_and_is_tracked_in_mlflow(tmp_path, world):
    import mlflow
    from mlflow import MlflowClient

    params = write_params(tmp_path, world, steps=24, log_every=4, ckpt_every=8, lr=3e-3)
    assert stage.main(stage_args(tmp_path, params)) == 0

    curve = pd.read_csv(tmp_path / "metrics/train_loss.csv")
    assert list(curve.columns) == ["step", "loss", "loss_itc", "loss_ml", "lr"]
    assert curve["step"].tolist() == [4, 8, 12, 16, 20, 24]
    assert curve["loss"].iloc[-2:].mean() < 0.8 * curve["loss"].iloc[:2].mean()  # the loss falls
    metrics = json.loads((tmp_path / "metrics/train.json").read_text())
    assert metrics["steps"] == 24 and metrics["final_loss"] == pytest.approx(curve["loss"].iloc[-1], rel=1e-4)

    from groupvit.checkpoint import load_pretrained
    model = load_pretrained(tmp_path / "model")
    trained = load_file(tmp_path / "model/model.safetensors")
    assert torch.equal(model.state_dict()["logit_scale"], trained["logit_scale"])
    assert json.loads((tmp_path / "model/config.json").read_text())["image_size"] == 32
    assert (tmp_path / "model/resolved_config.yaml").is_file()

    registered = json.loads((tmp_path / "model/mlflow.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(registered["run_id"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["train.lr"] == "0.003" and p["model.preset"] == "tiny" and p["data.multi_label"] == "3"
    assert p["run.world_size"] == "1" and p["run.global_batch"] == "8"
    assert run.data.tags["stage"] == "train" and "git_commit" in run.data.tags
    assert run.info.run_name == "train/groupvit"  # the baseline stage passes --run-name train/vit_pixelwise
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [4, 8, 12, 16, 20, 24]
    assert [m.value for m in history] == pytest.approx(curve["loss"].tolist(), rel=1e-5)
    for key in ("loss_itc", "loss_ml", "lr", "logit_scale", "ml_logit_scale", "grad_norm", "images_per_s"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 6, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.safetensors", "model/config.json", "model/resolved_config.yaml"} <= artifacts
    assert "train_loss.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert registered["model_uri"] == "models:/gv-test/1"
    downloaded = Path(mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path / "dl")))
    assert (downloaded / "model.safetensors").read_bytes() == (tmp_path / "model/model.safetensors").read_bytes()

    # a params change retrains from scratch (the checkpoints' run finished): a new MLflow run with the new values,
    # the finished run's record untouched
    params = write_params(tmp_path, world, steps=8, log_every=4, ckpt_every=8, lr=2e-3)
    assert stage.main(stage_args(tmp_path, params)) == 0
    retrained = json.loads((tmp_path / "model/mlflow.json").read_text())
    assert retrained["run_id"] != registered["run_id"]
    assert client.get_run(retrained["run_id"]).data.params["train.lr"] == "0.002"
    assert client.get_run(registered["run_id"]).data.params["train.lr"] == "0.003"
    assert [m.step for m in client.get_metric_history(registered["run_id"], "loss")] == [4, 8, 12, 16, 20, 24]


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_end_with_identical_parameters(tmp_path, world):
    params = write_params(tmp_path, world, steps=3, batch_size=4)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/_ddp_worker.py"), str(params), str(tmp_path)]
    subprocess.run(cmd, check=True, env=env(), cwd=ROOT, timeout=300)
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from groupvit.model import GroupViT, ModelConfig
    torch.manual_seed(0)  # rank 0's initial weights: training moved them
    init = GroupViT(ModelConfig(preset="tiny", image_size=32, context_length=24)).state_dict()
    assert not torch.equal(init["logit_scale"], a["logit_scale"])


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """rank -> worker process among the launcher's descendants."""
    found = {}
    for p in launcher.children(recursive=True):
        try:
            rank = p.environ().get("RANK")
            if rank is not None and "pipelines.stages.train" in " ".join(p.cmdline()) and "--worker" in p.cmdline():
                found[int(rank)] = p
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_a_rerun_resumes_to_the_uninterrupted_result(tmp_path, world):
    full, broken = tmp_path / "full", tmp_path / "broken"
    for d in (full, broken):
        d.mkdir()
    train = dict(steps=6, batch_size=4, nproc=2, log_every=2, ckpt_every=2)
    cmd = [PYTHON, "-m", "pipelines.cli", "train"]

    db = tmp_path / "mlflow.db"  # one store for both runs: its tables are created once
    subprocess.run(cmd + stage_args(full, write_params(full, world, db, **train)), check=True, env=env(), cwd=ROOT,
                   timeout=300)

    params = write_params(broken, world, db, **train)
    proc = subprocess.Popen(cmd + stage_args(broken, params), env=env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    latest = broken / "train/checkpoints/latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = _workers(psutil.Process(proc.pid))
    assert 1 in victims, f"no rank-1 worker found (launcher exit {proc.poll()})"
    os.kill(victims[1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)  # torchrun tears rank 0 down: an error, never a hang
    assert proc.returncode != 0, out
    assert "training failed" in out
    step = int(latest.read_text().strip()[len("step_"):-len(".pt")])
    assert 2 <= step < 6
    assert not (broken / "model").exists() and not (broken / "metrics/train.json").exists()

    run_id = json.loads((broken / "train/mlflow_run.json").read_text())["run_id"]

    subprocess.run(cmd + stage_args(broken, params), check=True, env=env(), cwd=ROOT, timeout=300)
    assert json.loads((broken / "metrics/train.json").read_text())["steps"] == 6
    assert json.loads((broken / "model/mlflow.json").read_text())["run_id"] == run_id  # the MLflow run continues
    a, b = load_file(full / "model/model.safetensors"), load_file(broken / "model/model.safetensors")
    for k in a:  # BatchNorm statistics included: they are in the checkpoint too
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    curve = pd.read_csv(broken / "metrics/train_loss.csv")
    assert curve["step"].tolist() == [2, 4, 6]  # the curve continues across the restart
