"""`groupvit demo`: the Gradio page served by the real command on a loopback port, driven through Gradio's API client
and in headless Chromium (Debian's package, via Playwright), with a tiny real model; and its parts on their own."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from groupvit.checkpoint import export_hf, export_official, save_pretrained, weights_digest
from groupvit.errors import DataError
from groupvit.evaluation.config import EvaluateConfig, ModelSpec
from groupvit.evaluation.datasets import read_image
from groupvit.evaluation.inference import LoadedModel, segment_image
from groupvit.evaluation.segmentation import stage_group_maps
from groupvit.evaluation.visualize import class_legend, prediction_figure, prediction_overlay
from groupvit.model import GroupViT, ModelConfig
from groupvit.procs import TiedProcess
from groupvit.synth.config import SynthConfig
from pipelines import demo_app
from pipelines.demo_browser import free_port
from pipelines.demo_examples import example_scenes, examples_dir

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["tomato", "lemon", "leaf"]
TINY = dict(preset="tiny", image_size=32, embed_dim=32, num_heads=(2, 2, 2), depths=(1, 1, 1), text_width=32,
            text_layers=1, text_heads=2, output_dim=16, proj_hidden_dim=32, context_length=16,
            num_group_tokens=(8, 2, 0), num_output_groups=(8, 2))
TUNED = 0.4  # the threshold thresholds.json records for the tiny model


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """A tiny two-stage model as the train stage leaves it (with resolved_config.yaml), the evaluate outputs that
    tuned a threshold for it, a class list of an evaluate data set, and a params file pointing at them."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = GroupViT(ModelConfig(**TINY))
    save_pretrained(model, root / "model")
    (root / "model" / "resolved_config.yaml").write_text("model: {preset: tiny}\n")
    (root / "val").mkdir()
    (root / "val" / "class_names.txt").write_text("\n".join(["background", *CATEGORIES]) + "\n")
    (root / "eval").mkdir()
    (root / "eval" / "thresholds.json").write_text(json.dumps({"groupvit": {
        "bg_thresh": TUNED, "data_set": "synth_val", "model": str(root / "model"),
        "weights_sha256": weights_digest(model)}}))
    params = {"evaluate": {"segmentation": [{"name": "synth_val", "root": str(root / "val"), "mode": "whole"}],
                           "output_dir": str(root / "eval"), "threads": 2},
              "synth": {"categories": ["tomato", "lemon", "leaf", "star"]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "model": root / "model", "params": root / "params.yaml"}


def evaluate_cfg(project) -> EvaluateConfig:
    from groupvit.config import load_section

    return load_section(EvaluateConfig, project["params"], "evaluate")


def write_image(path: Path, mode: str, size=(48, 40)) -> Path:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return path


# --- the parts, in process --------------------------------------------------------------------------------------

def test_shipped_examples_are_the_generators_held_out_scenes():
    shipped = sorted(examples_dir().glob("*.png"))
    scenes = example_scenes()
    assert [p.stem for p in shipped] == [name for name, _ in scenes] == [f"test_{i:06d}" for i in range(4)]
    for path, (_, image) in zip(shipped, scenes, strict=True):
        assert path.stat().st_size < 20_000  # shipped small
        assert np.array_equal(np.asarray(Image.open(path)), image), f"{path} differs from the generator's scene"


@pytest.mark.parametrize("text, message", [
    ("", "none given"), (" , ,", "none given"), ("cat, dog, Cat", "'cat', 'Cat' listed more than once"),
    ("cat, background", "'background' is implicit"), (",".join(f"c{i}" for i in range(101)), "limit of 100"),
])
def test_a_bad_class_list_is_refused_with_the_reason(text, message):
    with pytest.raises(DataError, match=message):
        demo_app.parse_class_list(text)


def test_a_class_list_is_split_on_commas_and_stripped():
    assert demo_app.parse_class_list(" cat ,dog,, blue sky ") == ["cat", "dog", "blue sky"]


@pytest.mark.parametrize("mode, note", [("L", "converted from grayscale to RGB"),
                                        ("RGBA", "converted from RGBA (alpha dropped) to RGB"), ("RGB", None)])
def test_grayscale_and_rgba_uploads_are_converted_as_groupvit_segment_reads_them(tmp_path, mode, note):
    path = write_image(tmp_path / "in.png", mode)
    image, notes = demo_app.read_upload(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 48)
    assert torch.equal(image, read_image(path))  # the pixels `groupvit segment` sees
    assert notes == ([note] if note else [])


def test_a_large_upload_is_downscaled_to_the_stated_limit(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 1500), (200, 30, 30)).save(path)
    image, notes = demo_app.read_upload(path)
    assert image.shape == (3, 512, 1024)
    assert notes == ["downscaled from 3000 x 1500 to 1024 x 512 px (the page's limit is 1024 px on the long side)"]


def test_uploads_over_the_pixel_limit_or_not_images_are_refused_naming_the_file(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 5_001)).save(huge)  # 50.01 Mpx, a small file
    with pytest.raises(DataError, match=r"huge.png: 10000 x 5001 px is over the page's limit of 50 megapixels"):
        demo_app.read_upload(huge)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (6500, 100)).save(strip)
    with pytest.raises(DataError, match=r"strip.png: .* aspect ratio of 65:1"):
        demo_app.read_upload(strip)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    with pytest.raises(DataError, match=r"^notes.txt: not an image \(expected a JPEG, PNG"):
        demo_app.read_upload(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(write_image(tmp_path / "whole.png", "RGB").read_bytes()[:200])
    with pytest.raises(DataError, match=r"^cut.png: not a readable image"):
        demo_app.read_upload(truncated)


def test_segment_image_runs_one_forward_for_the_prediction_and_the_stage_groups(project):
    """The page's (and `groupvit segment`'s) result equals the separate computations, at the cost of one forward."""
    cfg = evaluate_cfg(project)
    model = LoadedModel(ModelSpec("m", str(project["model"])), "fp32")
    calls = []
    forward = model.segmentation_outputs
    model.segmentation_outputs = lambda x: calls.append(x.shape) or forward(x)
    image = torch.from_numpy(example_scenes(1)[0][1].copy()).permute(2, 0, 1)
    result = segment_image(model, image, CATEGORIES, cfg, 0.5)
    assert len(calls) == 1
    fresh = segment_image(model, image, CATEGORIES, cfg, 0.5, picture=False).segmenter  # its own forward
    fresh.encode = forward
    assert torch.equal(result.pred, fresh.predict(image[None], 0.5)[0])
    groups = stage_group_maps(fresh, image)
    assert len(result.stage_groups) == 2 and all(torch.equal(a, b) for a, b in zip(result.stage_groups, groups,
                                                                                   strict=True))
    assert result.picture == prediction_figure(fresh, image, result.pred, result.class_names)


def test_the_page_starts_with_the_training_classes_and_the_tuned_threshold(project, tmp_path):
    cfg = evaluate_cfg(project)
    synth = SynthConfig(categories=("tomato", "lemon", "leaf", "star"))
    demo = demo_app.load_demo(project["model"], cfg, synth)
    assert demo.classes == CATEGORIES and "synth_val" in demo.classes_source  # the evaluate data set's list
    assert demo.bg_thresh == TUNED and "tuned on synth_val" in demo.bg_source
    (project["root"] / "val" / "class_names.txt").rename(tmp_path / "moved.txt")
    try:
        assert demo_app.default_classes(project["model"], cfg, synth)[0] == list(synth.categories)
    finally:
        (tmp_path / "moved.txt").rename(project["root"] / "val" / "class_names.txt")
    # released weights (an official .pth, a Hugging Face folder): the 20 PASCAL VOC classes, the VOC threshold
    export_official(project["model"], tmp_path / "official.pth")
    export_hf(project["model"], tmp_path / "hf")
    for released in (tmp_path / "official.pth", tmp_path / "hf"):
        demo = demo_app.load_demo(released, cfg, synth)
        assert len(demo.classes) == 20 and demo.classes[0] == "aeroplane" and demo.classes[-1] == "monitor"
        assert demo.bg_thresh == TUNED  # the same weights: thresholds.json matches them by digest, whatever file
    with pytest.raises(DataError, match="nope: model folder or file not found"):
        demo_app.load_demo(tmp_path / "nope", cfg, synth)


def test_the_overlay_and_legend_use_the_colours_of_the_evaluation_pictures():
    image = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    pred = torch.tensor([[0, 0, 2, 2]] * 4)
    overlay = prediction_overlay(image, pred)
    assert overlay.shape == (4, 4, 3) and overlay.dtype == np.uint8
    assert overlay[0, 0].tolist() == [50, 50, 50] and overlay[0, 3].tolist() == [50, 114, 50]  # VOC 2 = (0, 128, 0)
    assert class_legend(pred, ["background", "cat", "dog"]) == [("background", (0, 0, 0)), ("dog", (0, 128, 0))]


# --- the real command, over loopback HTTP --------------------------------------------------------------------------

def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """`groupvit demo` on a free loopback port, stopped with SIGTERM at the end (which must end it cleanly)."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-log") / "demo.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio")),
           "no_proxy": "127.0.0.1,localhost"}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the command switches analytics off itself
    with log.open("wb") as out:
        proc = TiedProcess([sys.executable, "-m", "pipelines.cli", "demo", "--params", str(project["params"]),
                            "--model", str(project["model"]), "--port", str(port)], cwd=ROOT, env=env,
                           stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            get(url)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"groupvit demo did not serve {url}:\n{log.read_text()}")
            time.sleep(0.5)
    yield {"url": url, "proc": proc, "log": log}
    rc = proc.stop(signal.SIGTERM, timeout=60)
    assert rc == 0, f"groupvit demo ended with {rc} on SIGTERM:\n{log.read_text()}"


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def submit(client, image: Path, classes: str, bg_thresh: float = 0.5, top_k: int = 5) -> tuple:
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), classes, bg_thresh, top_k, api_name="/segment")


@pytest.mark.slow
def test_the_page_segments_through_the_api_as_segment_image_does(project, server, client):
    example = examples_dir() / "test_000000.png"
    overlay, legend, groups, table, status = submit(client, example, "tomato, lemon , leaf", 0.5, 2)
    assert status.startswith("Segmented 64 x 64 px into 3 classes + background (threshold 0.5, top-2)")
    # the same code path in process gives the same classes and shares
    model = LoadedModel(ModelSpec("m", str(project["model"])), "fp32")
    cfg = evaluate_cfg(project)
    expected = segment_image(model, read_image(example), CATEGORIES, dataclasses.replace(cfg, top_k=2), 0.5,
                             picture=False)
    rows = sorted(expected.fractions(), key=lambda r: -r[1])
    assert table["data"] == [[name, round(100 * share, 2)] for name, share in rows]
    names = [name for name, _ in class_legend(expected.pred, expected.class_names)]
    assert all(f"</span>{n}</span>" in legend for n in names) and legend.count("gv-swatch") == len(names)
    picture = np.asarray(Image.open(overlay))
    assert picture.shape == (256, 256, 3)  # 64 px enlarged 4x for the page
    assert np.array_equal(picture[::4, ::4], prediction_overlay(read_image(example), expected.pred))
    assert [g["caption"] for g in groups] == [f"stage {i + 1} groups ({len(torch.unique(g))} used)"
                                              for i, g in enumerate(expected.stage_groups)]
    config = json.loads(get(server["url"] + "config"))  # what the browser is given: the page's starting values
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"]}
    assert props["gv-threshold"]["value"] == TUNED and props["gv-classes"]["value"] == ", ".join(CATEGORIES)


@pytest.mark.slow
def test_bad_input_is_a_message_on_the_page_and_the_app_keeps_serving(server, client, tmp_path):
    example = examples_dir() / "test_000001.png"
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 5_001)).save(huge)
    cases = [(text, "tomato", "**Error:** notes.txt: not an image"),
             (huge, "tomato", "**Error:** huge.png: 10000 x 5001 px is over the page's limit of 50 megapixels"),
             (example, " , ", "**Error:** class names: none given"),
             (example, "leaf, tomato, leaf", "**Error:** class names: 'leaf' listed more than once")]
    for image, classes, message in cases:
        overlay, legend, groups, table, status = submit(client, image, classes)
        assert status.startswith(message) and overlay is None and legend == "" and groups == [] and table["data"] == []
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Value 1.5 is greater than maximum value 1.0"):  # Gradio's slider refuses it
        submit(client, example, "tomato", bg_thresh=1.5)
    large, grey = tmp_path / "large.jpg", write_image(tmp_path / "grey.png", "L")
    Image.new("RGB", (2048, 1536), (90, 160, 40)).save(large)
    *_, status = submit(client, large, "leaf")
    assert "The image was downscaled from 2048 x 1536 to 1024 x 768 px (the page's limit is 1024 px" in status
    *_, status = submit(client, grey, "leaf")
    assert status.startswith("Segmented 48 x 40 px") and "converted from grayscale to RGB" in status
    assert server["proc"].poll() is None


def browser_or_skip() -> None:
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make test` installs it (make chromium)")
        pytest.skip("no chromium: `make chromium` installs Debian's package")


@pytest.mark.slow
def test_a_browser_segments_an_uploaded_image_with_typed_classes(server, tmp_path):
    from pipelines.demo_browser import segment_in_browser

    browser_or_skip()
    upload = tmp_path / "photo.jpg"  # an upload, not one of the examples: a 128 x 96 JPEG
    Image.fromarray(np.kron(example_scenes(2)[1][1], np.ones((2, 2, 1), np.uint8))[:96]).save(upload)
    shot = tmp_path / "page.png"
    good, bad = segment_in_browser(server["url"], upload, "fish, leaf, tomato", bad_classes="fish, Fish",
                                   screenshot=shot)
    assert good.status.startswith("Segmented 128 x 96 px into 3 classes + background")
    assert good.overlay_size == (384, 288)  # 128 x 96 enlarged 3x for the page
    assert good.legend and set(good.legend) <= {"background", "fish", "leaf", "tomato"}
    assert sorted(good.legend) == sorted(row[0] for row in good.table)
    assert good.groups == 2  # one picture per grouping stage
    assert bad.status.startswith("Error: class names: 'fish', 'Fish' listed more than once")
    assert bad.legend == [] and bad.overlay_size == (0, 0)
    assert good.outside == [], f"the page requested hosts outside this machine: {good.outside}"
    assert Image.open(shot).size[0] == 1400
