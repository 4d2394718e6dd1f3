"""The ablation grid: the pure planning helper, and a real two-variant ablation under the Prefect `ablation` flow
(real stages on the tiny preset, sqlite-backed MLflow, a temporary Prefect server)."""
from __future__ import annotations

import json

import pytest
import yaml
from _orchestration import ROOT, built_project_repo  # noqa: I001 (sets PREFECT_HOME before Prefect is imported)

from groupvit.config import build, load_section
from groupvit.errors import ConfigError
from pipelines.ablation import markdown_table, plan
from pipelines.config import AblationConfig
from pipelines.stages import ablate as ablate_stage

AXES = {
    "group_tokens": {"16-4": "model.num_group_tokens=[16,4,0]", "32-8": "model.num_group_tokens=[32,8,0]"},
    "assignment": {"hard": "model.hard_assignment=true", "soft": ["model.hard_assignment=false"]},
    "stages": {"2-stage": [], "1-stage": ["model.depths=[4,1]", "model.num_group_tokens=[16,0]"]},
}


def config(**kw) -> AblationConfig:
    return build(AblationConfig, {"axes": AXES, **kw}, "params.yaml: ablate")


def test_one_at_a_time_changes_one_axis_from_the_baseline():
    variants = plan(config())
    assert [v.name for v in variants] == ["baseline", "group-tokens-32-8", "assignment-soft", "stages-1-stage"]
    assert variants[0].axes == {"group_tokens": "16-4", "assignment": "hard", "stages": "2-stage"}
    assert variants[2].overrides == ("model.num_group_tokens=[16,4,0]", "model.hard_assignment=false")
    # Later axes win on shared keys: the 1-stage variant's group tokens replace the baseline's.
    assert variants[3].overrides[-1] == "model.num_group_tokens=[16,0]"


def test_a_changed_axis_wins_over_later_axes_baselines_on_shared_keys():
    axes = {"method": {"ours": [], "reference": ["model.hard_assignment=true", "model.num_group_tokens=[16,4,0]"]},
            "group_tokens": {"8": "model.num_group_tokens=[8,0]", "16": "model.num_group_tokens=[16,0]"}}
    reference = plan(build(AblationConfig, {"axes": axes}, "params.yaml: ablate"))[1]
    assert reference.name == "method-reference"
    assert reference.overrides == ("model.num_group_tokens=[8,0]", "model.hard_assignment=true",
                                   "model.num_group_tokens=[16,4,0]")  # applied in order: the recipe's value is last


def test_grid_is_the_cartesian_product():
    variants = plan(config(mode="grid"))
    assert len(variants) == 8 and len({v.name for v in variants}) == 8
    assert variants[-1].axes == {"group_tokens": "32-8", "assignment": "soft", "stages": "1-stage"}
    assert variants[-1].name == "group-tokens-32-8-assignment-soft-stages-1-stage"


@pytest.mark.parametrize("axes, message", [
    (None, "expected a mapping of axis name"),
    ({"a": ["x=1"]}, "ablate.axes.a: expected a mapping of value label"),
    ({"a": {"on": "not an override"}}, "ablate.axes.a.on: expected 'section.key=value'"),
])
def test_bad_axes_are_named_in_the_error(axes, message):
    with pytest.raises(ConfigError, match=message):
        plan(build(AblationConfig, {"axes": axes}, "params.yaml: ablate"))


def test_markdown_table_lines_up_axes_metric_and_losses():
    results = [{"name": "baseline", "axes": {"assignment": "hard"}, "status": "FINISHED",
                "metrics": {"evaluate.json:m": 41.5, "train.json:final_loss": 2.0}},
               {"name": "assignment-soft", "axes": {"assignment": "soft"}, "status": "FAILED", "metrics": {}}]
    table = markdown_table(results, "evaluate.json:m").splitlines()
    assert table[0] == "| variant | assignment | evaluate.json:m | train.json:final_loss | status |"
    assert table[2] == "| baseline | hard | 41.5000 | 2.0000 | FINISHED |"
    assert table[3] == "| assignment-soft | soft | - | - | FAILED |"


def test_cli_lists_the_variants_of_the_project_params(capsys):
    params = str(ROOT / "params.yaml")
    assert ablate_stage.main(["--params", params, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = plan(load_section(AblationConfig, params, "ablate"))
    assert [line.split()[0] for line in out] == [v.name for v in expected] and out[0].startswith("baseline ")
    assert ablate_stage.main(["--params", params, "--list", "--only", "nope"]) == 2


@pytest.mark.slow
def test_ablation_flow_logs_one_parent_with_a_child_per_variant(tmp_path):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.flows import ablation

    repo = built_project_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ablate"]["axes"] = {"assignment": {"hard": "model.hard_assignment=true",
                                               "soft": "model.hard_assignment=false"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=120):
        state = ablation(workdir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["failed"] == []

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("groupvit-ablation")
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["assignment-soft", "baseline"]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        folder = repo / "data/ablation" / child.info.run_name
        expected = json.loads((folder / "metrics/evaluate.json").read_text())["synth_test"]["groupvit"]["miou"]
        assert child.data.params["axis.assignment"] == {"baseline": "hard"}.get(child.info.run_name, "soft")
        assert child.data.metrics["miou"] == pytest.approx(expected)
        assert len(client.get_metric_history(child.info.run_id, "loss")) == 2  # logged per step by the train stage
        assert (folder / "data/model/model.safetensors").is_file()
    assert len(client.search_model_versions("name='groupvit'")) == 1  # the pipeline's model; variants never register
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"table.md", "chart.png", "grid.json"}
    table = (repo / "data/ablation/table.md").read_text()
    assert "| baseline | hard |" in table and "| assignment-soft | soft |" in table
    assert (repo / "data/ablation/chart.png").read_bytes()[:4] == b"\x89PNG"
