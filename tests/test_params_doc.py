"""docs/params.md and the config registry: one class per params.yaml section, a help text for every key, and the
committed page equal to what the generator makes of the code and params.yaml."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from groupvit.config import KNOWN_SECTIONS
from groupvit.errors import ConfigError
from pipelines import params_doc
from pipelines.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def _spec_classes(cls: type) -> dict[str, type]:
    """Field name -> dataclass of the list-of-mapping fields of `cls` (evaluate's models and data sets)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is tuple and args and dataclasses.is_dataclass(args[0]):
            out[f.name] = args[0]
    return out


def _help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def test_every_section_has_one_config_class_and_the_three_lists_agree():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert tuple(SECTIONS) == KNOWN_SECTIONS == tuple(params)
    assert all(dataclasses.is_dataclass(cls) for cls in SECTIONS.values())


@pytest.mark.parametrize("section", KNOWN_SECTIONS)
def test_every_key_of_every_config_class_has_a_one_line_help_text(section):
    classes = [SECTIONS[section], *_spec_classes(SECTIONS[section]).values()]
    for cls in classes:
        missing = [name for name, text in _help(cls).items() if not text.strip()]
        assert not missing, f"{cls.__qualname__}: no param(help=...) for {missing}"
        assert not [name for name, text in _help(cls).items() if "\n" in text]


def test_every_key_params_yaml_sets_is_a_documented_key():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in params.items():
        cls = SECTIONS[section]
        helps, specs = _help(cls), _spec_classes(cls)
        for key, value in (values or {}).items():
            assert helps.get(key), f"params.yaml: {section}.{key} has no help text in {cls.__qualname__}"
            for entry in value if key in specs else []:
                spec_helps = _help(specs[key])
                for sub in entry:
                    assert spec_helps.get(sub), f"params.yaml: {section}.{key}[].{sub} has no help text"


def test_the_committed_page_is_the_generators_output():
    committed = (ROOT / "docs" / "params.md").read_text()
    assert committed == params_doc.render(ROOT / "params.yaml"), \
        "docs/params.md is stale: regenerate it with `make docs` (or .venv/bin/python -m pipelines.params_doc)"
    assert params_doc.main(["--check"]) == 0


def _row(page: str, key: str, after: str) -> list[str]:
    """The cells of the first table row of `key` after the heading `after`."""
    rest = page[page.index(after):]
    line = next(line for line in rest.splitlines() if line.startswith(f"| `{key}` |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_the_page_shows_the_params_value_only_where_it_differs_from_the_default(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({
        "train": {"batch_size": 64, "steps": 0, "lr": "8e-4"},
        "evaluate": {"segmentation": [{"name": "a", "root": "r", "mode": "whole"}, {"name": "b", "root": "s"}]}}))
    page = params_doc.render(p)
    # columns: key, type, default, allowed, params.yaml (or one per entry), meaning
    assert _row(page, "batch_size", "## `train`")[2:5] == ["`256`", ">= 1", "`64`"]
    assert _row(page, "steps", "## `train`")[4] == ""  # set to its default: nothing to show
    assert _row(page, "lr", "## `train`")[4] == "`0.0008`"  # YAML 1.1's string "8e-4", read as the stage reads it
    assert _row(page, "precision", "## `train`")[3] == "one of `bf16`, `fp16`, `fp32`"
    mode = _row(page, "mode", "### `evaluate.segmentation` entries")
    assert mode[4:6] == ["`whole`", ""] and mode[6].startswith("whole = one window")
    assert _row(page, "name", "### `evaluate.segmentation` entries")[2:6] == ["required", "", "`a`", "`b`"]


def test_a_key_the_config_class_refuses_is_an_error_naming_it(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  batch_sise: 64\n")
    with pytest.raises(ConfigError, match=r"params.yaml: train.batch_sise: unknown key"):
        params_doc.render(p)
    out = tmp_path / "params.md"
    assert params_doc.main(["--params", str(p), "--out", str(out)]) == 2
    assert "error: " in capsys.readouterr().err and not out.exists()


def test_check_reports_a_stale_page_and_writes_nothing(tmp_path):
    out = tmp_path / "params.md"
    out.write_text("# Parameters\n")
    assert params_doc.main(["--out", str(out), "--check"]) == 1
    assert out.read_text() == "# Parameters\n"
    assert params_doc.main(["--out", str(out)]) == 0
    assert params_doc.main(["--out", str(out), "--check"]) == 0


def test_the_orchestration_configs_and_the_light_stages_do_not_import_torch():
    """SECTIONS is built lazily because the model and training packages import torch: the Prefect flows, `groupvit
    download` and `groupvit synth` read their configs without it."""
    code = ("import sys; from pipelines.config import OrchestrationConfig, AblationConfig; "
            "import pipelines.stages.download, pipelines.stages.nouns, pipelines.stages.synth; "
            "print(sorted(m for m in ('torch', 'spacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
