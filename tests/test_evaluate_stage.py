"""`groupvit evaluate` and `groupvit segment` end to end: a tiny synthetic world, real (tiny) models, sqlite MLflow."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from groupvit.checkpoint import load_pretrained, save_pretrained, weights_digest
from groupvit.config import build
from groupvit.evaluation.config import EvaluateConfig
from groupvit.model import GroupViT, ModelConfig
from groupvit.synth import CaptionStyle, WorldSpec, write_world
from pipelines.stages import evaluate as stage
from pipelines.stages import segment
from pipelines.tracking import write_model_record

CATEGORIES = ("tomato", "lemon", "leaf")
TINY = dict(preset="tiny", image_size=32, embed_dim=32, num_heads=(2, 2, 2), depths=(1, 1, 1), text_width=32,
            text_layers=1, text_heads=2, output_dim=16, proj_hidden_dim=32, context_length=16,
            num_group_tokens=(8, 2, 0), num_output_groups=(8, 2))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_world(out, WorldSpec(image_size=32, categories=CATEGORIES, min_objects=1, max_objects=2),
                CaptionStyle(), seed=0, counts={"train": 1, "val": 6, "test": 5}, url_base="http://127.0.0.1:1")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_pretrained(GroupViT(ModelConfig(**TINY)), root / "model")
    baseline = dict(TINY, depths=(2,), num_heads=(2,), num_group_tokens=(0,), num_output_groups=())
    save_pretrained(GroupViT(ModelConfig(**baseline)), root / "baseline")
    write_model_record(root / "model", {"registered_model": "groupvit", "version": "3"})
    return {"groupvit": root / "model", "vit_pixelwise": root / "baseline"}


def write_params(tmp_path: Path, world: Path, model_dirs: dict[str, Path], **extra) -> Path:
    section = {
        "models": [{"name": "groupvit", "path": str(model_dirs["groupvit"])},
                   {"name": "vit_pixelwise", "path": str(model_dirs["vit_pixelwise"])},
                   {"name": "missing", "path": str(tmp_path / "nope"), "optional": True}],
        "segmentation": [
            {"name": "synth_val", "root": str(world / "val"), "mode": "whole", "short_side": 0,
             "sweep": [0.2, 0.5, 0.8]},
            {"name": "synth_test", "root": str(world / "test"), "mode": "whole", "short_side": 64,
             "bg_thresh_from": "synth_val"},
            {"name": "voc", "root": str(tmp_path / "VOCdevkit/VOC2012"), "optional": True},
        ],
        "classification": [{"name": "synth_single", "root": str(world / "test"), "layout": "single_object",
                            "resize": 0, "crop": 0}],
        "num_pictures": 2, "batch_size": 4,
        "output_dir": str(tmp_path / "eval"), "metrics_file": str(tmp_path / "metrics/evaluate.json"),
        "per_class_file": str(tmp_path / "metrics/per_class_iou.csv"),
    }
    section.update(extra)
    params = {"base": {"seed": 0}, "evaluate": section,
              "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t", "system_metrics": False}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def plant_stale_temporaries(targets: list[Path]) -> list[Path]:
    """The temporaries a writer killed between its write and its rename leaves beside each target (groupvit.atomic's
    names, with the pid of a process that has exited): the next atomic write of a target removes its own."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    stale = [t.with_name(f".{t.name}.tmp{child.pid}") for t in targets]
    for s in stale:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_text("half")
    return stale


@pytest.mark.slow
def test_evaluate_writes_metrics_tables_pictures_and_mlflow_run(tmp_path, world, models):
    params = write_params(tmp_path, world, models)
    written = [tmp_path / p for p in ("metrics/evaluate.json", "metrics/per_class_iou.csv", "eval/per_class_iou.csv",
                                      "eval/thresholds.json", "eval/pictures/synth_test_000_test_000000_groupvit.png")]
    stale = plant_stale_temporaries(written)
    assert stage.main(["--params", str(params)]) == 0
    assert all(p.is_file() for p in written) and not [s for s in stale if s.exists()]  # every file via groupvit.atomic

    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"synth_val", "synth_test", "classification", "comparison"}  # optional VOC skipped
    val, test = metrics["synth_val"], metrics["synth_test"]
    for name in ("groupvit", "vit_pixelwise"):
        assert 0 <= test[name]["miou"] <= 100 and 0 <= test[name]["pixel_accuracy"] <= 100
        assert set(val[name]["sweep"]) == {"0.2", "0.5", "0.8", "0.95"}  # sweep + the configured (VOC default)
        # the test threshold is the one tuned on validation, per model
        assert test[name]["bg_thresh"] == val[name]["best_bg_thresh"]
        assert val[name]["best_miou"] == max(val[name]["sweep"].values())
        assert -1 <= test[name]["prompt_cosine"] <= 1 and test[name]["num_images"] == 5
        assert 0 < test[name]["oracle_miou"] <= 100 and test[name]["groups_per_image"] >= 1
        assert metrics["classification"]["synth_single"][name]["num_images"] >= 1
    assert 0 < test["all_background_miou"] < 100
    # the thresholds `groupvit segment` reuses, each tied to the digest of the weights it was tuned for
    tuned = json.loads((tmp_path / "eval/thresholds.json").read_text())
    for name in ("groupvit", "vit_pixelwise"):
        assert tuned[name]["bg_thresh"] == val[name]["best_bg_thresh"] and tuned[name]["data_set"] == "synth_val"
        assert tuned[name]["weights_sha256"] == weights_digest(load_pretrained(models[name]))
    assert tuned["groupvit"]["weights_sha256"] != tuned["vit_pixelwise"]["weights_sha256"]
    assert metrics["comparison"]["synth_test"]["groupvit_over_vit_pixelwise"] == pytest.approx(
        test["groupvit"]["miou"] / test["vit_pixelwise"]["miou"], abs=1e-3)

    with open(tmp_path / "metrics/per_class_iou.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["background", *CATEGORIES]
    assert set(rows[0]) == {"class", "groupvit", "vit_pixelwise"}
    long_rows = list(csv.DictReader(open(tmp_path / "eval/per_class_iou.csv")))
    assert {r["dataset"] for r in long_rows} == {"synth_val", "synth_test"}

    pictures = sorted((tmp_path / "eval/pictures").glob("*.png"))
    assert len(pictures) == 4  # 2 images x 2 models
    assert Image.open(pictures[0]).size[0] > 300  # image, prediction, truth and 2 stages side by side
    assert yaml.safe_load((tmp_path / "eval/resolved_config.yaml").read_text())["evaluate"]["top_k"] == 5

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["t"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["metrics.synth_test/groupvit/miou"] == pytest.approx(test["groupvit"]["miou"])
    assert "metrics.synth_test/groupvit/oracle_miou" in run and "metrics.synth_val/groupvit/prompt_cosine" in run
    assert run["tags.groupvit.version"] == "3"
    artifacts = mlflow.MlflowClient().list_artifacts(run["run_id"], "pictures")
    assert len(artifacts) == 4


@pytest.mark.slow
def test_soft_assignment_and_slide_mode_run(tmp_path, world, models):
    params = write_params(tmp_path, world, {"groupvit": models["groupvit"], "vit_pixelwise": models["vit_pixelwise"]},
                         assignment="soft", num_pictures=0, classification=[])
    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["segmentation"] = [{"name": "synth_test", "root": str(world / "test"), "mode": "slide",
                                        "short_side": 48, "crop": 32, "stride": 16, "bg_thresh": 0.5}]
    params.write_text(yaml.safe_dump(raw))
    assert stage.main(["--params", str(params), "--no-tracking"]) == 0
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["synth_test"]["groupvit"]["bg_thresh"] == 0.5
    assert "oracle_miou" not in metrics["synth_test"]["groupvit"]  # sliding windows have no image-wide groups
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_config_and_missing_model_fail_clearly(tmp_path, world, models, capsys):
    params = write_params(tmp_path, world, models, models=[{"name": "groupvit", "path": str(tmp_path / "none")}])
    assert stage.main(["--params", str(params), "--no-tracking"]) == 2
    assert f"model folder {tmp_path / 'none'} (groupvit) not found" in capsys.readouterr().err
    assert stage.main(["--params", str(params), "--set", "evaluate.assignment=fuzzy"]) == 2
    assert "evaluate.assignment" in capsys.readouterr().err
    assert not (tmp_path / "metrics/evaluate.json").exists()  # nothing written by failed runs
    params = write_params(tmp_path, world, models, segmentation=[{"name": "t", "root": str(world / "test"),
                                                                  "split": "train"}], classification=[])
    assert stage.main(["--params", str(params), "--no-tracking"]) == 2
    assert "ImageSets/Segmentation/train.txt: split file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_segment_demo_writes_overlay(tmp_path, world, models, capsys):
    image = world / "test" / "JPEGImages" / sorted(p.name for p in (world / "test/JPEGImages").iterdir())[0]
    out = tmp_path / "demo.png"
    params = write_params(tmp_path, world, models)
    stale = plant_stale_temporaries([out])
    rc = segment.main([str(image), "--classes", "cat, dog,sky", "--model", str(models["groupvit"]), "--out", str(out),
                       "--params", str(params)])
    assert rc == 0 and Image.open(out).size[0] > 300 and not stale[0].exists()  # written by groupvit.atomic
    printed = capsys.readouterr().out
    assert "demo.png:" in printed and "(bg_thresh 0.95)" in printed  # no tuned threshold on record: VOC's
    # with a threshold on record for these weights, the demo uses it; one tuned for other weights it ignores
    digest = weights_digest(load_pretrained(models["groupvit"]))
    tuned = tmp_path / "eval/thresholds.json"
    tuned.parent.mkdir(parents=True, exist_ok=True)
    for sha, expected in ((digest, "0.3"), ("0" * 64, "0.95")):
        tuned.write_text(json.dumps({"groupvit": {"bg_thresh": 0.3, "data_set": "synth_val", "weights_sha256": sha,
                                                  "model": str(models["groupvit"])}}))
        assert segment.main([str(image), "--classes", "cat", "--model", str(models["groupvit"]), "--out", str(out),
                             "--params", str(params)]) == 0
        assert f"(bg_thresh {expected})" in capsys.readouterr().out
    tuned.write_text(json.dumps({"groupvit": {"weights_sha256": digest}}))  # a hand-edited file without the value
    assert segment.main([str(image), "--classes", "cat", "--model", str(models["groupvit"]), "--out", str(out),
                         "--params", str(params)]) == 2
    assert "thresholds.json: groupvit.bg_thresh: expected a number in [0, 1], found None" in capsys.readouterr().err
    assert segment.main([str(image), "--classes", "cat", "--model", str(models["groupvit"]), "--out", str(out),
                         "--params", str(params), "--bg-thresh", "0.7"]) == 0
    assert "(bg_thresh 0.7)" in capsys.readouterr().out
    assert segment.main([str(image), "--classes", " , ", "--model", str(models["groupvit"]),
                         "--params", str(params)]) == 2
    assert "expected a comma-separated list" in capsys.readouterr().err
    assert segment.main([str(tmp_path / "none.jpg"), "--classes", "cat", "--params", str(params)]) == 2
    assert "none.jpg: image not found" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_trained_model_beats_all_background(tmp_path):
    """Train a tiny one-stage GroupViT for 100 steps with the project's loop and loss on an easy synthetic world
    (one object of two categories, captions that name object and background), then evaluate it with the stage and
    the reference algorithm (threshold tuned on the split: 41.6-44.1 mIoU over model seeds 0-2 against 27.8 for
    all-background, measured; lr 1e-2 collapsed the text tower to all-background, so the rate is 5e-3).
    """
    from groupvit import tokenize
    from groupvit.losses import GroupViTLoss
    from groupvit.model import IMAGENET_MEAN, IMAGENET_STD
    from groupvit.synth import generate
    from groupvit.training.config import TrainConfig
    from groupvit.training.distributed import DistInfo
    from groupvit.training.loop import fit

    spec = WorldSpec(image_size=32, categories=("tomato", "cloud"), min_objects=1, max_objects=1,
                     object_scale=(0.5, 0.7))
    style = CaptionStyle(omit_prob=0, no_object_prob=0, synonym_prob=0, size_prob=0, background_prob=1.0,
                         tag_prob=0)
    write_world(tmp_path / "synth", spec, style, seed=0, counts={"train": 1, "val": 24, "test": 1},
                url_base="http://127.0.0.1:1")
    scenes = [generate(spec, style, 0, "train", i) for i in range(768)]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(np.stack([s.image for s, _ in scenes])).permute(0, 3, 1, 2) / 255.0 - mean) / std
    cfg = ModelConfig(**dict(TINY, depths=(1, 1), num_heads=(2, 2), num_group_tokens=(4, 0), num_output_groups=(4,),
                             multi_label=False))
    tokens = tokenize([c for _, c in scenes], cfg.context_length)

    def batches(epoch):
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(scenes) // 32):
            idx = order[i * 32:(i + 1) * 32]
            yield pixels[idx], tokens[idx][:, None]

    torch.manual_seed(0)
    model = GroupViT(cfg)
    train = TrainConfig(steps=100, batch_size=32, lr=5e-3, lr_base_batch=32, warmup_steps=5, min_lr=1e-5,
                        precision="fp32", log_every=50, resume=False)
    fit(model, GroupViTLoss(multi_label=False), batches, cfg=train, steps_per_epoch=len(scenes) // 32,
        info=DistInfo(), device=torch.device("cpu"), seed=0, progress=False)
    save_pretrained(model.eval(), tmp_path / "model")

    section = {"models": [{"name": "groupvit", "path": str(tmp_path / "model")}],
               "segmentation": [{"name": "synth_val", "root": str(tmp_path / "synth/val"), "mode": "whole",
                                 "short_side": 0, "sweep": [0.1, 0.5, 0.95, 1.0]}],
               "num_pictures": 0, "output_dir": str(tmp_path / "eval"),
               "metrics_file": str(tmp_path / "evaluate.json"), "per_class_file": str(tmp_path / "per_class.csv")}
    results = stage.evaluate(build(EvaluateConfig, section, "evaluate"))
    val = results["synth_val"]
    assert val["groupvit"]["best_miou"] > val["all_background_miou"] + 5, val


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_any_work(tmp_path, world, models, capsys, caplog):
    caplog.set_level("INFO", logger="groupvit.evaluate")
    params = write_params(tmp_path, world, models)
    uri = f"http://127.0.0.1:{closed_port()}"
    assert stage.main(["--params", str(params), "--set", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: tracking.uri: MLflow tracking server {uri} is not reachable")
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "eval").exists()  # nothing evaluated or written
    assert not [r for r in caplog.records if "mIoU" in r.getMessage()]


@pytest.mark.parametrize("case", ["missing_root", "report", "bg_thresh_from"])
def test_config_errors_of_later_data_sets_fail_before_any_work(case, tmp_path, world, models, capsys, caplog):
    caplog.set_level("INFO", logger="groupvit.evaluate")
    val = {"name": "synth_val", "root": str(world / "val"), "mode": "whole", "short_side": 0}
    extra, message = {
        "missing_root": (dict(segmentation=[val, {"name": "gone", "root": str(tmp_path / "nope")}]),
                         f"evaluate.segmentation.gone.root: {tmp_path / 'nope'} not found"),
        "report": (dict(segmentation=[val], report="voc"), "evaluate.report: 'voc' is not an evaluated segmentation"),
        "bg_thresh_from": (dict(segmentation=[val, dict(val, name="t", bg_thresh_from="synth_val")]),
                           "evaluate.segmentation.t.bg_thresh_from: 'synth_val' is not an earlier evaluated data set "
                           "with a threshold sweep"),
    }[case]
    params = write_params(tmp_path, world, models, classification=[], **extra)
    assert stage.main(["--params", str(params), "--no-tracking"]) == 2
    assert not [r for r in caplog.records if "mIoU" in r.getMessage()]  # synth_val was not evaluated first
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics").exists()


def truncated_model(models, tmp_path) -> Path:
    """A copy of the tiny model folder whose model.safetensors lost its second half (an interrupted download)."""
    import shutil

    broken = tmp_path / "broken_model"
    shutil.copytree(models["groupvit"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return broken


def test_truncated_weights_are_one_line_errors_in_evaluate_and_segment(tmp_path, world, models, capsys):
    broken = truncated_model(models, tmp_path)
    params = write_params(tmp_path, world, models, models=[{"name": "groupvit", "path": str(broken)}])
    assert stage.main(["--params", str(params), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'model.safetensors'}: not a readable safetensors file")
    assert err.count("\n") == 1 and not (tmp_path / "metrics").exists()
    image = next((world / "test" / "JPEGImages").iterdir())
    assert segment.main([str(image), "--classes", "cat", "--model", str(broken), "--out", str(tmp_path / "o.png"),
                         "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {broken / 'model.safetensors'}: not a readable safetensors file")
    assert not (tmp_path / "o.png").exists()


def test_segment_refuses_an_extreme_aspect_ratio_at_once(tmp_path, world, models, capsys):
    """A 1 x 20000 px strip: resized to the short side it would be 64 x 1280000 px (and never finish). It is refused
    with the limit named, well within a generous bound of 60 s and 1 GiB more peak memory."""
    import resource
    import time

    strip = tmp_path / "strip.png"
    Image.fromarray(np.full((1, 20000, 3), 128, dtype=np.uint8)).save(strip)
    params = write_params(tmp_path, world, models)
    peak, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()  # ru_maxrss in KiB
    rc = segment.main([str(strip), "--classes", "cat", "--model", str(models["groupvit"]),
                       "--out", str(tmp_path / "strip_seg.png"), "--params", str(params)])
    assert time.monotonic() - start < 60
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 20
    assert rc == 2
    assert (f"error: {strip}: 1 x 20000 px (height x width) has an aspect ratio of 20000:1, over the limit of 64:1"
            in capsys.readouterr().err)
    assert not (tmp_path / "strip_seg.png").exists()


def test_segment_help_states_the_size_limits(capsys):
    with pytest.raises(SystemExit):
        segment.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "capped at 4096 px on its long side and 4,194,304 px in all" in text and "64:1 are refused" in text


def test_the_runs_table_compares_models_by_mlflow_run_and_times_the_evaluation(tmp_path, world, models):
    """After `dvc repro` a user opens the experiment on its runs table (the experiment is marked as model training,
    not GenAI), finds `miou_test` on each training run, and an evaluate run whose duration is the evaluation's (it
    used to start after the work, and showed 50 ms)."""
    import shutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("t")
    with mlflow.start_run(run_name="train/groupvit") as training:
        pass
    model_dir = tmp_path / "model"
    shutil.copytree(models["groupvit"], model_dir)
    write_model_record(model_dir, {"run_id": training.info.run_id, "tracking_uri": uri, "experiment": "t"})
    params = write_params(tmp_path, world, {**models, "groupvit": model_dir})
    assert stage.main(["--params", str(params)]) == 0

    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    client = mlflow.MlflowClient(uri)
    trained = client.get_run(training.info.run_id).data
    assert trained.metrics["miou_test"] == pytest.approx(metrics["synth_test"]["groupvit"]["miou"])
    assert trained.metrics["miou_val"] == pytest.approx(metrics["synth_val"]["groupvit"]["best_miou"])
    assert trained.metrics["group_oracle"] == pytest.approx(metrics["synth_test"]["groupvit"]["oracle_miou"])
    evaluate_run = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                      filter_string="attributes.run_name = 'evaluate'")[0]
    assert trained.tags["evaluated_by"] == evaluate_run.info.run_id
    assert evaluate_run.data.metrics["miou_test/vit_pixelwise"] == pytest.approx(
        metrics["synth_test"]["vit_pixelwise"]["miou"])
    # the run began before the work it records: before the metrics file was written, not after
    assert evaluate_run.info.start_time / 1000 < (tmp_path / "metrics/evaluate.json").stat().st_mtime
    assert client.get_experiment_by_name("t").tags["mlflow.experimentKind"] == "custom_model_development"
