"""groupvit.evaluation.inference and the pictures: the one code path from a model folder to a segmentation, shared by
`groupvit evaluate`, `groupvit segment` and a demo, on a real tiny model and a tiny synthetic world."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from groupvit.checkpoint import load_pretrained, save_pretrained, weights_digest
from groupvit.errors import DataError
from groupvit.evaluation.config import EvaluateConfig, ModelSpec, SegmentationSpec
from groupvit.evaluation.datasets import SegmentationDataset, read_image
from groupvit.evaluation.inference import LoadedModel, load_models, make_segmenter, segment_image, segmentation_settings
from groupvit.evaluation.segmentation import SegmentationSettings, Segmenter
from groupvit.evaluation.visualize import write_pictures
from groupvit.model import IMAGENET_MEAN, IMAGENET_STD, GroupViT, ModelConfig
from groupvit.synth import CaptionStyle, WorldSpec, write_world

TINY = dict(preset="tiny", image_size=32, embed_dim=32, num_heads=(2, 2, 2), depths=(1, 1, 1), text_width=32,
            text_layers=1, text_heads=2, output_dim=16, proj_hidden_dim=32, context_length=16,
            num_group_tokens=(8, 2, 0), num_output_groups=(8, 2))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_world(out, WorldSpec(image_size=32, categories=("tomato", "lemon"), min_objects=1, max_objects=2),
                CaptionStyle(), seed=0, counts={"train": 1, "val": 1, "test": 3}, url_base="http://127.0.0.1:1")
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "model"
    torch.manual_seed(0)
    save_pretrained(GroupViT(ModelConfig(**TINY)), path)
    return path


@pytest.fixture(scope="module")
def model(model_dir) -> LoadedModel:
    return LoadedModel(ModelSpec("groupvit", str(model_dir)), "fp32")


def test_loaded_model_ties_thresholds_to_its_weights(model, model_dir):
    assert model.name == "groupvit" and model.path == model_dir
    assert model.digest == weights_digest(load_pretrained(model_dir))
    assert model.logit_scale == pytest.approx(float(model.model.logit_scales()[0].detach()))


def test_load_models_skips_an_optional_absent_folder_and_names_a_required_one(model_dir, tmp_path):
    loaded = load_models([ModelSpec("a", str(model_dir)), ModelSpec("b", str(tmp_path / "no"), optional=True)],
                         "fp32")
    assert [m.name for m in loaded] == ["a"]
    with pytest.raises(DataError, match=f"model folder {tmp_path / 'no'} \\(b\\) not found"):
        load_models([ModelSpec("b", str(tmp_path / "no"))], "fp32")
    with pytest.raises(DataError, match="no model to evaluate"):
        load_models([ModelSpec("b", str(tmp_path / "no"), optional=True)], "fp32")


def test_make_segmenter_prompts_the_classes_then_the_kinds_of_background(model):
    settings = SegmentationSettings("whole", 0, 2048, 1, 1, 5, True)
    seg = make_segmenter(model, ["cat", "dog"], ["a photo of a {}."], settings, background_prompts=("sky",))
    assert torch.equal(seg.text, model.text_embeddings(["cat", "dog", "sky"], ["a photo of a {}."]))
    assert seg.background_prompts == 1 and seg.logit_scale == model.logit_scale and seg.settings is settings


def test_segmentation_settings_follow_the_data_set_and_the_assignment():
    spec = SegmentationSpec("s", "r", mode="whole", short_side=64, long_side=512, crop=32, stride=16)
    got = segmentation_settings(EvaluateConfig(top_k=3, assignment="soft"), spec)
    assert got == SegmentationSettings("whole", 64, 512, 32, 16, 3, False)


def test_segment_image_is_the_reference_segmenter_in_whole_mode(model, world):
    image = read_image(next((world / "test" / "JPEGImages").iterdir()))
    cfg = EvaluateConfig(templates="itap of a {}.", top_k=1)
    result = segment_image(model, image, ["cat", "dog"], cfg, 0.5, title="t")
    # by hand: whole image, short side 2x the training size (64 for 32), the config's templates and top-k
    text = model.text_embeddings(["cat", "dog"], ["itap of a {}."])
    by_hand = Segmenter(model.segmentation_outputs, text, model.logit_scale,
                        SegmentationSettings("whole", 64, 4096, 1, 1, 1, True), IMAGENET_MEAN, IMAGENET_STD)
    assert result.segmenter.settings == by_hand.settings and torch.equal(result.segmenter.text, text)
    assert torch.equal(result.pred, by_hand.predict(image[None], 0.5)[0])
    assert result.pred.shape == image.shape[-2:] and result.class_names == ["background", "cat", "dog"]
    assert sum(f for _, f in result.fractions()) == pytest.approx(1.0)
    assert {n for n, _ in result.fractions()} <= set(result.class_names)
    assert Image.open(io.BytesIO(result.picture)).size[0] > 100
    everything = segment_image(model, image, ["cat", "dog"], cfg, 0.0, short_side=32)  # threshold 0: no background
    assert 0 not in everything.pred.unique().tolist()


def test_write_pictures_names_each_file_and_writes_it_atomically(model, world, tmp_path):
    ds = SegmentationDataset(world / "test", "voc", "val")
    seg = make_segmenter(model, ds.class_names[1:], ["a photo of a {}."],
                         SegmentationSettings("whole", 0, 2048, 1, 1, 5, True))
    folder = tmp_path / "pictures"
    first = f"synth_test_000_{ds[0].id}_groupvit.png"
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    folder.mkdir()
    (folder / f".{first}.tmp{child.pid}").write_bytes(b"half a picture")  # left by a writer killed before its rename
    paths = write_pictures(folder, ds, {"groupvit": seg}, "synth_test", {"groupvit": 0.5}, count=2)
    assert [p.name for p in paths] == [first, f"synth_test_001_{ds[1].id}_groupvit.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)  # the stale temporary is gone
    assert all(Image.open(p).size[0] > 100 for p in paths)
    assert write_pictures(tmp_path / "none", ds, {"groupvit": seg}, "s", {"groupvit": 0.5}, count=0) == []
