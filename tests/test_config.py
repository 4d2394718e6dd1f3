"""Typed params: every kind of error names the file, the key, what was expected and what was found."""
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from groupvit.config import load_section, param, save_resolved, flat_dict
from groupvit.errors import ConfigError
from pipelines import cli


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
    p = write(tmp_path, {"toy": {"steps": 5}})
    cfg = load_section(Toy, p, "toy", ["toy.lr=0.5", "toy.depths=[3,4]", "toy.scale=[0.25, 2]"])
    assert cfg == Toy(steps=5, lr=0.5, depths=(3, 4), scale=(0.25, 2.0))
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_int_accepted_for_float(tmp_path):
    assert load_section(Toy, write(tmp_path, {"toy": {"lr": 1}}), "toy").lr == 1.0


def test_exponent_without_a_dot_is_a_float_although_yaml_reads_a_string(tmp_path):
    # PyYAML (YAML 1.1) resolves `8e-4` to the string "8e-4"; users write it in params.yaml and in --set / -S
    p = write(tmp_path, {"toy": {"steps": 5}})
    assert load_section(Toy, p, "toy", ["toy.lr=8e-4"]).lr == 8e-4
    assert load_section(Toy, p, "toy", ["toy.scale=[1e-1, 2E+0]"]).scale == (0.1, 2.0)
    with pytest.raises(ConfigError, match="toy.lr.*expected float.*'8e'"):
        load_section(Toy, p, "toy", ["toy.lr=8e"])


@pytest.mark.parametrize("section, needles", [
    ({"stpes": 3}, ["toy.stpes", "unknown key", "steps"]),
    ({"steps": "ten"}, ["toy.steps", "expected int", "'ten'"]),
    ({"steps": 1.5}, ["toy.steps", "expected int", "1.5"]),
    ({"steps": True}, ["toy.steps", "expected int", "True"]),
    ({"steps": 0}, ["toy.steps", ">= 1", "found 0"]),
    ({"lr": 0}, ["toy.lr", "> 0", "found 0"]),
    ({"mode": "tile"}, ["toy.mode", "slide", "'tile'"]),
    ({"depths": [2, 0]}, ["toy.depths", ">= 1", "found 0"]),
    ({"depths": 2}, ["toy.depths", "list of int", "found 2"]),
    ({"scale": [1.0]}, ["toy.scale", "list [float, float]", "[1.0]"]),
    ({"scale": [1.0, "x"]}, ["toy.scale[1]", "expected float", "'x'"]),
])
def test_errors_name_file_key_expected_found(tmp_path, section, needles):
    p = write(tmp_path, {"toy": section})
    with pytest.raises(ConfigError) as e:
        load_section(Toy, p, "toy")
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(Toy, tmp_path / "nope.yaml", "toy")
    with pytest.raises(ConfigError, match="missing section 'toy'"):
        load_section(Toy, write(tmp_path, {"other": {}}), "toy")


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_section(Toy, write(tmp_path, {"toy": {}}), "toy", ["steps=3"])


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
