"""Typed params: every kind of error names the file, the key, what was expected and what was found."""
import dataclasses
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from groupvit.config import KNOWN_SECTIONS, flat_dict, load_section, param, save_resolved
from groupvit.errors import ConfigError
from pipelines import cli
from pipelines.common import STAGE_SECTIONS

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Toy:
    steps: int = param(10, ge=1, help="steps")
    lr: float = param(1e-3, gt=0)
    mode: str = param("slide", choices=("slide", "whole"))
    depths: tuple[int, ...] = param((2, 2), ge=1)
    name: str | None = None
    scale: tuple[float, float] = param((0.5, 1.0), gt=0)


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_and_override(tmp_path):
    p = write(tmp_path, {"train": {"steps": 5}})
    cfg = load_section(Toy, p, "train", ["train.lr=0.5", "train.depths=[3,4]", "train.scale=[0.25, 2]"])
    assert cfg == Toy(steps=5, lr=0.5, depths=(3, 4), scale=(0.25, 2.0))
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'steps'"):
        cfg.steps = 3  # frozen


def test_int_accepted_for_float(tmp_path):
    assert load_section(Toy, write(tmp_path, {"train": {"lr": 1}}), "train").lr == 1.0


def test_exponent_without_a_dot_is_a_float_although_yaml_reads_a_string(tmp_path):
    # PyYAML (YAML 1.1) resolves `8e-4` to the string "8e-4"; users write it in params.yaml and in --set / -S
    p = write(tmp_path, {"train": {"steps": 5}})
    assert load_section(Toy, p, "train", ["train.lr=8e-4"]).lr == 8e-4
    assert load_section(Toy, p, "train", ["train.scale=[1e-1, 2E+0]"]).scale == (0.1, 2.0)
    with pytest.raises(ConfigError, match="train.lr.*expected float.*'8e'"):
        load_section(Toy, p, "train", ["train.lr=8e"])


@pytest.mark.parametrize("section, needles", [
    ({"stpes": 3}, ["train.stpes", "unknown key", "steps"]),
    ({"steps": "ten"}, ["train.steps", "expected int", "'ten'"]),
    ({"steps": 1.5}, ["train.steps", "expected int", "1.5"]),
    ({"steps": True}, ["train.steps", "expected int", "True"]),
    ({"steps": 0}, ["train.steps", ">= 1", "found 0"]),
    ({"lr": 0}, ["train.lr", "> 0", "found 0"]),
    ({"mode": "tile"}, ["train.mode", "slide", "'tile'"]),
    ({"depths": [2, 0]}, ["train.depths", ">= 1", "found 0"]),
    ({"depths": 2}, ["train.depths", "list of int", "found 2"]),
    ({"scale": [1.0]}, ["train.scale", "list [float, float]", "[1.0]"]),
    ({"scale": [1.0, "x"]}, ["train.scale[1]", "expected float", "'x'"]),
])
def test_errors_name_file_key_expected_found(tmp_path, section, needles):
    p = write(tmp_path, {"train": section})
    with pytest.raises(ConfigError) as e:
        load_section(Toy, p, "train")
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(Toy, tmp_path / "nope.yaml", "train")
    with pytest.raises(ConfigError, match="missing section 'train'"):
        load_section(Toy, write(tmp_path, {"model": {}}), "train")


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_section(Toy, write(tmp_path, {"train": {}}), "train", ["steps=3"])


def test_save_resolved_roundtrip(tmp_path):
    path = save_resolved(tmp_path / "out" / "resolved_config.yaml", toy=Toy())
    data = yaml.safe_load(path.read_text())
    assert data == {"toy": {"steps": 10, "lr": 1e-3, "mode": "slide", "depths": [2, 2], "name": None,
                            "scale": [0.5, 1.0]}}
    assert flat_dict({"toy": data["toy"]})["toy.depths"] == "[2, 2]"


def test_cli_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


# ---- sections: unknown ones refused, unread overrides and empty sections warned, one `base` for every stage ----

@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """The project's params.yaml, copied into an empty working directory: every data path it names is missing, so a
    stage that got past its config fails fast instead of working on the checkout's data."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "params.yaml"


def test_project_params_hold_exactly_the_known_sections_and_each_stage_reads_its_dvc_params():
    assert list(yaml.safe_load((ROOT / "params.yaml").read_text())) == list(KNOWN_SECTIONS)
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        command = stage["cmd"].split()[1]
        assert {p.split(".")[0] for p in stage.get("params", [])} <= set(STAGE_SECTIONS[command]), name


@pytest.mark.parametrize("argv, section", [
    (["train", "--set", "trian.steps=3"], "trian"),
    (["synth", "--set", "no_such_section.x=1"], "no_such_section"),
    (["evaluate", "--set", "evaluate.top_k=1", "--set", "evalute.top_k=1"], "evalute"),
])
def test_an_override_of_an_unknown_section_is_refused(project, capsys, argv, section):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set") and f"unknown section {section!r}" in err and "\n" not in err
    assert "known sections: " + ", ".join(KNOWN_SECTIONS) in err


def test_an_unknown_section_in_the_params_file_is_refused(tmp_path, capsys):
    p = write(tmp_path, {"base": {"seed": 0}, "synth": {"preset": "tiny", "out_dir": str(tmp_path / "w")},
                         "trian": {"steps": 3}})
    assert cli.main(["synth", "--params", str(p)]) == 2
    assert f"error: {p}: unknown section 'trian' (known sections: base," in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    # keys that lost their indentation under `train:` land at the top level: refused, with a hint
    p.write_text("train:\nsteps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'steps'.*lost its indentation"):
        load_section(Toy, p, "train")


def test_an_override_of_a_section_the_stage_does_not_read_is_warned_once(tmp_path, caplog):
    p = write(tmp_path, {"synth": {"preset": "tiny", "out_dir": str(tmp_path / "w"), "num_train": 2, "num_val": 1,
                                   "num_test": 1, "workers": 1}})
    with caplog.at_level(logging.WARNING):
        assert cli.main(["synth", "--params", str(p), "--set", "train.steps=3", "--set", "synth.num_train=3"]) == 0
    warned = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert warned == ["--set: `groupvit synth` does not read section train (it reads base, synth); those "
                      "overrides have no effect"]
    assert (tmp_path / "w").is_dir()


def test_an_empty_section_is_warned_and_takes_the_defaults(tmp_path, caplog):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n")
    with caplog.at_level(logging.WARNING, logger="groupvit.config"):
        assert load_section(Toy, p, "train") == Toy()
        load_section(Toy, p, "train")
    assert [r.getMessage() for r in caplog.records] == [f"{p}: section 'train' is empty: every train key takes "
                                                        f"its default"]
    assert load_section(Toy, p, "train", ["train.steps=3"]).steps == 3  # an override fills the empty section


def test_an_override_that_is_not_yaml_is_one_line_naming_it(project, capsys):
    with pytest.raises(ConfigError, match=r"--set 'train.steps=\[1': the value '\[1' is not valid YAML"):
        load_section(Toy, project, "train", ["train.steps=[1"])
    assert cli.main(["train", "--set", "train.steps=[1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set 'train.steps=[1': the value '[1' is not valid YAML (") and "\n" not in err


@pytest.mark.parametrize("command", ["synth", "train", "evaluate"])
@pytest.mark.parametrize("seed, found", [("abc", "'abc' (str)"), ("1.5", "1.5 (float)"), ("-1", "-1")])
def test_base_seed_is_read_one_way_by_every_stage(project, capsys, command, seed, found):
    if command == "evaluate":  # its section (read first) checks that the data sets exist
        from groupvit.synth import CaptionStyle, WorldSpec, write_world

        write_world(project.parent / "data/synth", WorldSpec(image_size=32), CaptionStyle(), seed=0,
                    counts={"train": 1, "val": 1, "test": 1}, url_base="http://127.0.0.1:1")
    assert cli.main([command, "--set", f"base.seed={seed}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: params.yaml: base.seed: expected ") and found in err and "\n" not in err


def test_the_console_script_refuses_an_unknown_section(project):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "synth", "--set", "no_such_section.x=1"],
                         capture_output=True, text=True, timeout=120, cwd=project.parent,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --set 'no_such_section.x=1': unknown section 'no_such_section' (known sections: "
        + ", ".join(KNOWN_SECTIONS) + ")"]
