"""groupvit.evaluation.thresholds: the threshold each data set is scored at, and `thresholds.json` written by
`groupvit evaluate` and read back by `groupvit segment` (a round trip, stale digests, hand-edited entries)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from groupvit.errors import DataError
from groupvit.evaluation.config import SegmentationSpec
from groupvit.evaluation.thresholds import (
    THRESHOLDS_FILE,
    bg_thresh_for,
    tuned_threshold,
    tuned_thresholds,
    write_thresholds,
)


@dataclass
class Model:  # what a tuned threshold records of a LoadedModel
    name: str
    path: Path
    digest: str


MODELS = [Model("groupvit", Path("data/model"), "a" * 64), Model("vit_pixelwise", Path("data/baseline"), "b" * 64)]
SPECS = (SegmentationSpec("synth_val", "v", sweep=(0.2, 0.5)), SegmentationSpec("synth_test", "t", sweep=(0.3,)))
RESULTS = {"synth_val": {"groupvit": {"best_bg_thresh": 0.5}, "vit_pixelwise": {"best_bg_thresh": 0.2},
                         "all_background_miou": 20.0},
           "synth_test": {"groupvit": {"best_bg_thresh": 0.3}, "vit_pixelwise": {"best_bg_thresh": 0.3}}}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_round_trip_gives_each_model_its_threshold_from_the_first_swept_data_set(tmp_path):
    write_thresholds(tmp_path, tuned_thresholds(SPECS, MODELS, RESULTS))
    assert tuned_threshold(tmp_path, "a" * 64) == (0.5, "synth_val")
    assert tuned_threshold(tmp_path, "b" * 64) == (0.2, "synth_val")
    # the bytes groupvit evaluate has always written (key order, indent, final newline)
    assert (tmp_path / THRESHOLDS_FILE).read_text() == (
        '{\n  "groupvit": {\n    "bg_thresh": 0.5,\n    "data_set": "synth_val",\n    "model": "data/model",\n'
        f'    "weights_sha256": "{"a" * 64}"\n  }},\n  "vit_pixelwise": {{\n    "bg_thresh": 0.2,\n'
        f'    "data_set": "synth_val",\n    "model": "data/baseline",\n    "weights_sha256": "{"b" * 64}"\n  }}\n}}\n')


def test_a_data_set_without_sweep_or_result_is_not_a_source(tmp_path):
    specs = (SegmentationSpec("synth_val", "v"), *SPECS[1:])  # synth_val not swept: synth_test is the source
    assert tuned_thresholds(specs, MODELS, RESULTS)["groupvit"]["data_set"] == "synth_test"
    assert tuned_thresholds(SPECS, MODELS, {"synth_test": RESULTS["synth_test"]})["groupvit"]["bg_thresh"] == 0.3
    assert tuned_thresholds(SPECS, MODELS, {}) == {}


def test_a_stale_digest_gives_none_and_names_the_models_it_was_tuned_for(tmp_path, caplog):
    write_thresholds(tmp_path, tuned_thresholds(SPECS, MODELS, RESULTS))
    with caplog.at_level(logging.WARNING, logger="groupvit.evaluation.thresholds"):
        assert tuned_threshold(tmp_path, "c" * 64) is None
    assert "no threshold tuned for these weights (tuned for data/model, data/baseline" in caplog.text
    assert tuned_threshold(tmp_path / "absent", "a" * 64) is None  # never evaluated: no file, no warning


@pytest.mark.parametrize("value", [None, "0.5", True, 1.5, -0.1, float("nan")])
def test_a_bad_value_for_these_weights_is_a_one_line_error(tmp_path, value):
    entry = {"bg_thresh": value, "data_set": "synth_val", "weights_sha256": "a" * 64}
    (tmp_path / THRESHOLDS_FILE).write_text(json.dumps({"groupvit": entry}))
    with pytest.raises(DataError, match=r"thresholds.json: groupvit.bg_thresh: expected a number in \[0, 1\]"):
        tuned_threshold(tmp_path, "a" * 64)
    assert tuned_threshold(tmp_path, "b" * 64) is None  # another model's bad entry is none of its business


@pytest.mark.parametrize("text, message", [("{not json", "not valid JSON"), ("[1, 2]", "expected an object of models")])
def test_a_damaged_file_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / THRESHOLDS_FILE).write_text(text)
    with pytest.raises(DataError, match=message):
        tuned_threshold(tmp_path, "a" * 64)


def test_the_file_is_written_atomically_and_a_dead_writers_temporary_removed(tmp_path):
    stale = tmp_path / f".{THRESHOLDS_FILE}.tmp{dead_pid()}"  # left by a writer killed before its rename
    stale.write_text("{half")
    write_thresholds(tmp_path, {})
    assert [p.name for p in tmp_path.iterdir()] == [THRESHOLDS_FILE]
    assert (tmp_path / THRESHOLDS_FILE).read_text() == "{}\n"


def test_bg_thresh_for_takes_the_tuned_then_the_set_then_the_layout_default():
    results = {"synth_val": {"groupvit": {"best_bg_thresh": 0.4}, "vit_pixelwise": {"miou": 1.0}}}
    assert bg_thresh_for(SegmentationSpec("t", "r", bg_thresh_from="synth_val", bg_thresh=0.9), results,
                         "groupvit") == 0.4
    assert bg_thresh_for(SegmentationSpec("t", "r", bg_thresh=0.7), results, "groupvit") == 0.7
    assert bg_thresh_for(SegmentationSpec("t", "r", layout="context"), results, "groupvit") == 0.35
    assert bg_thresh_for(SegmentationSpec("t", "r"), results, "groupvit") == 0.95
    with pytest.raises(DataError, match="t.bg_thresh_from: 'synth_val' is not an earlier data set with a threshold"):
        bg_thresh_for(SegmentationSpec("t", "r", bg_thresh_from="synth_val"), results, "vit_pixelwise")
