"""The synthetic world: config errors, determinism, exact masks, captions, VOC layout, url list, atomic output."""
import functools
import http.server
import re
import socket
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from groupvit.config import load_section
from groupvit.errors import ConfigError
from groupvit.evaluation.datasets import SegmentationDataset
from groupvit.synth import CATEGORIES, CaptionStyle, WorldSpec, generate, ignore_borders, make_scene
from groupvit.synth.backgrounds import BACKGROUNDS
from groupvit.synth.config import SynthConfig, check_url_base
from groupvit.synth.writer import encode_jpeg, voc_palette, write_world
from pipelines.stages import synth as stage


def params(tmp_path: Path, **synth) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"base": {"seed": 0}, "synth": {"preset": "tiny", "out_dir": str(tmp_path / "w"),
                                                                 "workers": 1, **synth}}))
    return p


# ---------------------------------------------------------------- configuration


def test_preset_fills_only_unset_sizes(tmp_path):
    cfg = load_section(SynthConfig, params(tmp_path, num_train=5), "synth")
    assert (cfg.num_train, cfg.num_val, cfg.num_test, cfg.image_size) == (5, 8, 8, 32)
    default = load_section(SynthConfig, params(tmp_path, preset="default"), "synth")
    assert default.num_train == 40000 and default.image_size == 64
    # The project's params.yaml is valid and uses every category.
    project = load_section(SynthConfig, Path(__file__).parents[1] / "params.yaml", "synth")
    assert project.categories == tuple(c.name for c in CATEGORIES)


@pytest.mark.parametrize("synth, needles", [
    ({"num_trian": 3}, ["synth.num_trian", "unknown key"]),
    ({"num_train": "many"}, ["synth.num_train", "expected int", "'many'"]),
    ({"num_train": 0}, ["synth.num_train", ">= 1", "found 0"]),
    ({"image_size": 16}, ["synth.image_size", ">= 32", "found 16"]),
    ({"image_size": 512}, ["synth.image_size", "<= 256"]),
    ({"preset": "huge"}, ["synth.preset", "tiny", "'huge'"]),
    ({"categories": ["tomato", "banana"]}, ["synth.categories", "'banana'"]),
    ({"categories": ["tomato", "tomato"]}, ["categories", "2 distinct"]),
    ({"min_objects": 5, "max_objects": 3}, ["min_objects", "<= max_objects"]),
    ({"object_scale": [0.6, 0.3]}, ["object_scale", "min <= max"]),
    ({"object_scale": [0.3, 0.4, 0.5]}, ["object_scale", "[min, max]"]),
    ({"object_scale": [0.0, 0.5]}, ["synth.object_scale", "> 0"]),
    ({"omit_prob": 1.5}, ["synth.omit_prob", "<= 1"]),
    ({"jpeg_quality": 20}, ["synth.jpeg_quality", ">= 50"]),
    ({"url_base": "http://example.com:80"}, ["url_base", "not a loopback"]),
    ({"url_base": "https://127.0.0.1:18765"}, ["url_base", "http://<loopback host>:<port>"]),
    ({"url_base": "http://127.0.0.1"}, ["url_base", "no valid port"]),
    ({"url_base": "http://127.0.0.1:18765/images"}, ["url_base", "path"]),
])
def test_config_errors_name_key_and_expectation(tmp_path, capsys, synth, needles):
    p = params(tmp_path, **synth)
    with pytest.raises(ConfigError) as e:
        load_section(SynthConfig, p, "synth")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    # The stage reports the same error as one line, exit code 2, and writes nothing.
    assert stage.main(["--params", str(p)]) == 2
    assert needles[0] in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_bad_seed_and_override(tmp_path, capsys):
    p = params(tmp_path)
    assert stage.main(["--params", str(p), "--set", "base.seed=-1"]) == 2
    assert "base.seed" in capsys.readouterr().err
    assert stage.main(["--params", str(p), "--set", "synth.workers=x"]) == 2
    assert "synth.workers" in capsys.readouterr().err


def test_base_section_must_be_a_mapping(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"base": [1], "synth": {"preset": "tiny", "out_dir": str(tmp_path / "w")}}))
    assert stage.main(["--params", str(p)]) == 2
    assert "base: expected a mapping" in capsys.readouterr().err


def test_category_subset_sets_the_class_list(tmp_path):
    spec = WorldSpec(image_size=32, categories=("tire", "ball"))
    classes = {c for i in range(30) for c in make_scene(spec, np.random.default_rng(i)).class_indices()}
    assert classes == {1, 2}
    write_world(tmp_path, spec, CaptionStyle(), seed=0, counts={"train": 2, "val": 1, "test": 1},
                url_base="http://127.0.0.1:1")
    assert (tmp_path / "test" / "class_names.txt").read_text().split() == ["background", "tire", "ball"]


def test_url_base_normalised():
    assert check_url_base("http://localhost:8000/") == "http://localhost:8000"
    assert check_url_base("http://[::1]:9000") == "http://[::1]:9000"


# ---------------------------------------------------------------- scenes and masks


@pytest.mark.parametrize("category", CATEGORIES, ids=lambda c: c.name)
def test_every_shape_fits_its_unit_disc(category):
    # Scene placement, clipping and the visibility rule rely on shapes staying inside radius 1.
    grid = np.linspace(-1.2, 1.2, 241, dtype=np.float32)
    u, v = np.meshgrid(grid, grid)
    region, rgb = category.draw(u, v, np.random.default_rng(0))
    assert region.dtype == bool and rgb.shape == (*u.shape, 3)
    assert region.any() and not region[np.hypot(u, v) >= 1.0].any()
    assert region.mean() > 0.15, "large enough to cover several patches"


@pytest.mark.parametrize("size", [32, 64, 96])
def test_labels_lie_inside_objects_of_their_class(size):
    spec = WorldSpec(image_size=size, min_objects=2, max_objects=5)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    for i in range(40):
        scene = make_scene(spec, np.random.default_rng([size, i]))
        assert scene.image.shape == (size, size, 3) and scene.label.shape == (size, size)
        assert scene.objects, "every scene holds at least one object"
        # Geometry, independent of the mask code: every shape lies inside its object's disc.
        for c in np.unique(scene.label[scene.label > 0]):
            inside = np.zeros((size, size), bool)
            for o in scene.objects:
                if o.class_index == c:
                    inside |= (xs - o.cx) ** 2 + (ys - o.cy) ** 2 <= o.radius ** 2
            assert inside[scene.label == c].all(), f"class {c} labelled outside every class-{c} object"
        # Occlusion: a pixel carries the class of the last object drawn over it, background where none is.
        owner = np.zeros((size, size), int)
        for k, o in enumerate(scene.objects, 1):
            y0, y1, x0, x1 = o.box
            owner[y0:y1, x0:x1][o.region] = k
        lookup = np.array([0] + [o.class_index for o in scene.objects])
        np.testing.assert_array_equal(scene.label, lookup[owner])
        # Every object is really in view (occlusion and the frame took at most 1 - min_visible of it).
        for k, o in enumerate(scene.objects, 1):
            assert o.visible == (owner == k).sum() >= spec.min_visible * o.area > 0
        assert scene.class_indices() == sorted(set(np.unique(scene.label).tolist()) - {0})


def test_objects_overlap_and_vary():
    spec = WorldSpec(image_size=64)
    scenes = [make_scene(spec, np.random.default_rng([7, i])) for i in range(150)]
    occluded = sum(any(o.visible < o.area for o in s.objects) for s in scenes)
    assert occluded > 10, "some objects are partly hidden (occlusion or the frame)"
    assert {len(s.objects) for s in scenes} >= {2, 3, 4}
    assert {s.background for s in scenes} == set(range(len(BACKGROUNDS)))
    seen = {o.class_index for s in scenes for o in s.objects}
    assert seen == set(range(1, len(spec.categories) + 1))


def test_categories_have_consistent_colours():
    # A category's mean colour varies little between instances compared with the gap between categories:
    # the property that made the world learnable (random colours per shape were not).
    spec = WorldSpec(image_size=64)
    means: dict[int, list[np.ndarray]] = {}
    for i in range(120):
        scene = make_scene(spec, np.random.default_rng([3, i]))
        for c in scene.class_indices():
            means.setdefault(c, []).append(scene.image[scene.label == c].mean(0))
    centres = {c: np.mean(v, 0) for c, v in means.items()}
    within = np.mean([np.linalg.norm(np.array(v) - centres[c], axis=1).mean() for c, v in means.items()])
    between = np.mean([np.linalg.norm(centres[a] - centres[b]) for a in centres for b in centres if a < b])
    assert len(centres) == len(spec.categories)
    assert within < 0.5 * between, (within, between)


def test_ignore_borders_marks_both_sides_of_every_boundary():
    label = np.zeros((6, 6), np.uint8)
    label[1:4, 1:4] = 3
    label[2:4, 3:5] = 5
    out = ignore_borders(label, 1)
    # A pixel is ignored exactly when a 4-neighbour has another label.
    pad = np.pad(label, 1, mode="edge")
    differs = np.zeros_like(label, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= pad[dy:dy + 6, dx:dx + 6] != label
    np.testing.assert_array_equal(out == 255, differs)
    np.testing.assert_array_equal(out[~differs], label[~differs])
    np.testing.assert_array_equal(ignore_borders(label, 0), label)
    assert (ignore_borders(label, 2) == 255).sum() > differs.sum()
    assert (ignore_borders(np.full((4, 4), 2, np.uint8), 1) == 2).all()  # no boundary, nothing ignored


# ---------------------------------------------------------------- captions

COLOURS = {"red", "yellow", "green", "blue", "white", "black", "orange", "purple", "brown", "grey", "gray", "gold",
           "silver", "pink", "teal", "dark"}


def _forms(category) -> list[str]:
    forms = [category.name, category.plural] + [w for pair in category.synonyms for w in pair]
    return sorted(set(forms), key=len, reverse=True)


def test_captions_are_led_by_object_nouns():
    spec, style = WorldSpec(image_size=32), CaptionStyle()  # captions do not depend on the image size
    bg_words = {w for b in BACKGROUNDS for p in b.phrases for w in p.split()} - {"a", "the", "on", "in", "at", "by"}
    canonical = named_total = no_object = 0
    captions = set()
    for i in range(400):
        scene, caption = generate(spec, style, 0, "train", i)
        captions.add(caption)
        text = caption.lower()
        assert not COLOURS & set(re.findall(r"[a-z]+", text)), caption
        present = {spec.categories[c - 1] for c in scene.class_indices()}
        named = set()
        for cat in CATEGORIES:
            for form in _forms(cat):
                if re.search(rf"\b{re.escape(form)}\b", text):
                    named.add(cat.name)
                    canonical += form in (cat.name, cat.plural)
                    text = re.sub(rf"\b{re.escape(form)}\b", " ", text)
                    break
        assert named <= present, (caption, present)  # never a false object word
        named_total += len(named)
        if not named:
            no_object += 1
            assert not bg_words & set(re.findall(r"[a-z]+", caption.lower())), caption  # no background-only caption
    assert len(captions) > 350, "templates, order, synonyms and counts vary"
    assert 0 < no_object < 40
    assert canonical > 0.6 * named_total, "the class name is the usual noun, so 'a photo of a {class}' works"


def test_caption_styles_do_not_move_images():
    spec = WorldSpec(image_size=32)
    a, cap_a = generate(spec, CaptionStyle(), 5, "train", 3)
    b, cap_b = generate(spec, CaptionStyle(omit_prob=0.0, synonym_prob=1.0, tag_prob=1.0), 5, "train", 3)
    np.testing.assert_array_equal(a.image, b.image)
    assert cap_a != cap_b


# ---------------------------------------------------------------- files on disk


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    spec, style = WorldSpec(image_size=32), CaptionStyle()
    counts = {"train": 20, "val": 4, "test": 4}
    kwargs = dict(seed=1, counts=counts, url_base="http://127.0.0.1:18765")
    write_world(tmp_path / "a", spec, style, workers=1, **kwargs)
    write_world(tmp_path / "b", spec, style, workers=2, **kwargs)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(a) == 20 + 2 * (4 + 4) + 2 + 2 * 2 and a == b
    write_world(tmp_path / "c", spec, style, **{**kwargs, "seed": 2})
    c = _tree(tmp_path / "c")
    assert c.keys() == a.keys() and c["train/images/00000000.jpg"] != a["train/images/00000000.jpg"]


@pytest.mark.slow
def test_stage_writes_voc_layout_the_evaluation_reader_accepts(tmp_path, capsys):
    p = params(tmp_path)
    assert stage.main(["--params", str(p)]) == 0
    assert "64 training images" in capsys.readouterr().out
    out = tmp_path / "w"
    cfg = load_section(SynthConfig, p, "synth")
    spec = cfg.world_spec()
    for split in ("val", "test"):
        ds = SegmentationDataset(out / split, layout="voc", split="val")
        assert ds.class_names == ["background", *spec.categories]
        assert len(ds) == 8
        for sample in ds:
            index = int(sample.id.split("_")[1])
            scene, _ = generate(spec, cfg.caption_style(), 0, split, index)
            # The mask on disk is the exact label map with the ignore band, stored losslessly.
            np.testing.assert_array_equal(sample.mask.numpy(), ignore_borders(scene.label, 1))
            # The JPEG is the same scene (aligned with the mask), only compressed.
            err = np.abs(sample.image.permute(1, 2, 0).numpy().astype(int) - scene.image.astype(int)).mean()
            assert err < 6, err
        with Image.open(out / split / "SegmentationClass" / f"{ds.ids[0]}.png") as im:
            assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    resolved = yaml.safe_load((out / "resolved_config.yaml").read_text())
    assert resolved["base"] == {"seed": 0} and resolved["synth"]["num_train"] == 64
    assert not list(tmp_path.glob(".w.*")), "no temporary folder left behind"


@pytest.mark.slow
def test_url_list_points_at_served_images(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = params(tmp_path, url_base=f"http://127.0.0.1:{port}/")
    assert stage.main(["--params", str(p)]) == 0
    train = tmp_path / "w" / "train"
    urls = pq.read_table(train / "urls.parquet").to_pylist()
    labels = pq.read_table(train / "labels.parquet").to_pylist()
    assert [r["key"] for r in urls] == [r["key"] for r in labels] and len(urls) == 64
    assert all(r["caption"] and r["url"] == f"http://127.0.0.1:{port}/{r['key']}.jpg" for r in urls)
    assert all(r["categories"] and set(r["categories"]) <= {c.name for c in CATEGORIES} for r in labels)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(train / "images"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for row in urls[:3]:
            with urllib.request.urlopen(row["url"], timeout=10) as r:
                assert r.read() == (train / "images" / f"{row['key']}.jpg").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_failed_run_keeps_the_previous_world(tmp_path, monkeypatch, capsys):
    p = params(tmp_path)
    assert stage.main(["--params", str(p)]) == 0
    before = _tree(tmp_path / "w")

    def broken(out, *args, **kwargs):
        (out / "train").mkdir(parents=True)
        (out / "train" / "urls.parquet").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(stage, "write_world", broken)
    with pytest.raises(OSError, match="disk full"):
        stage.main(["--params", str(p), "--set", "base.seed=3"])
    assert _tree(tmp_path / "w") == before
    assert not list(tmp_path.glob(".w.*"))


def test_jpeg_and_palette_are_fixed():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert encode_jpeg(image, 90) == encode_jpeg(image.copy(), 90)
    palette = voc_palette()
    assert palette[255].tolist() == [224, 224, 192] and palette[15].tolist() == [192, 128, 128]
