"""The ablation grid: the pure planning helper, and a real two-variant ablation under the Prefect `ablation` flow
(real stages on the tiny preset, sqlite-backed MLflow, a temporary Prefect server)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from _orchestration import ROOT, built_project_repo  # noqa: I001 (sets PREFECT_HOME before Prefect is imported)

from groupvit.config import build, load_section
from groupvit.errors import ConfigError
from pipelines.ablation import job_key, jobs, plan
from pipelines.ablation_report import _budget, _timing, collect, markdown, paper_sign, verdicts
from pipelines.config import AblationConfig
from pipelines.stages import ablate as ablate_stage

AXES = {
    "group_tokens": {"16": ["model.num_group_tokens=[16,0]", "model.num_output_groups=[16]"],
                     "8": ["model.num_group_tokens=[8,0]", "model.num_output_groups=[8]"]},
    "assignment": {"soft": "model.hard_assignment=false", "hard": ["model.hard_assignment=true"]},
    "stages": {"1-stage": ["model.depths=[3,2]", "model.num_group_tokens=[16,0]", "model.num_output_groups=[16]"],
               "2-stage": ["model.depths=[2,2,1]", "model.num_group_tokens=[16,4,0]",
                           "model.num_output_groups=[16,4]"]},
}
PAPER = ["model.depths=[2,2,1]", "model.num_group_tokens=[16,4,0]", "model.num_output_groups=[16,4]",
         "model.hard_assignment=true"]
# what params.yaml holds before any override (the one-stage soft default of this world)
PARAMS = {"base": {"seed": 0}, "model": {"depths": [3, 2], "num_group_tokens": [16, 0], "num_output_groups": [16],
                                         "hard_assignment": False}, "train": {"steps": 0}, "prefect": {"retries": 1}}


def config(**kw) -> AblationConfig:
    return build(AblationConfig, {"axes": AXES, **kw}, "params.yaml: ablate")


def test_one_at_a_time_varies_each_axis_from_each_base_once():
    variants = plan(config(bases={"this-world": [], "paper": {"set": PAPER, "axes": ["assignment", "stages"]}}),
                    PARAMS)
    assert [v.name for v in variants] == [
        "this-world/baseline", "this-world/group_tokens-8", "this-world/assignment-hard", "this-world/stages-2-stage",
        "paper/baseline", "paper/assignment-soft", "paper/stages-1-stage"]
    # a label whose overrides leave the base as it is is the base's own value, not a variant
    assert variants[0].axes == {"group_tokens": "16", "assignment": "soft", "stages": "1-stage"}
    assert variants[4].axes == {"group_tokens": "base", "assignment": "hard", "stages": "2-stage"}
    assert variants[5].changed == ("assignment",) and variants[5].overrides == (*PAPER, "model.hard_assignment=false")
    assert variants[0].overrides == () and variants[4].changed == ()


def test_grid_is_the_product_of_the_labels_that_change_the_base():
    variants = plan(config(mode="grid"), PARAMS)
    # 2 x 2 x 2 points, but the 2-stage recipe sets its own group tokens: with 8 or 16 it is the same model, run once
    assert [v.name for v in variants] == [
        "this-world/baseline", "this-world/stages-2-stage", "this-world/assignment-hard",
        "this-world/assignment-hard_stages-2-stage", "this-world/group_tokens-8",
        "this-world/group_tokens-8_assignment-hard"]


def test_jobs_are_seed_major_so_a_study_stopped_early_has_every_variant_once():
    cfg = config(seeds=[0, 1])
    names = [j.name for j in jobs(cfg, plan(cfg, PARAMS))]
    assert names[:4] == ["this-world/baseline/seed0", "this-world/group_tokens-8/seed0",
                         "this-world/assignment-hard/seed0", "this-world/stages-2-stage/seed0"]
    assert names[4] == "this-world/baseline/seed1" and len(names) == 8


def test_a_jobs_key_follows_what_decides_its_result_and_nothing_else():
    cfg = config(seeds=[0, 1])
    a, b = jobs(cfg, plan(cfg, PARAMS))[:2]
    data = {"data/shards": "abc"}
    key = job_key(a, (), PARAMS, data)
    assert key == job_key(a, (), {**PARAMS, "prefect": {"retries": 5}}, data)  # orchestration: same result
    assert key != job_key(a, ("train.steps=50",), PARAMS, data)  # the budget
    assert key != job_key(a, (), PARAMS, {"data/shards": "abd"})  # the data
    assert key != job_key(jobs(cfg, plan(cfg, PARAMS))[4], (), PARAMS, data)  # the seed
    assert key != job_key(b, (), PARAMS, data)


@pytest.mark.parametrize("section, message", [
    ({"axes": None}, "expected a mapping of axis name"),
    ({"axes": {"a": ["x=1"]}}, "ablate.axes.a: expected a mapping of value label"),
    ({"axes": {"a": {"on": "not an override"}}}, "ablate.axes.a.on: expected 'section.key=value'"),
    ({"axes": AXES, "bases": {"p": {"set": [], "axes": ["nope"]}}}, "ablate.bases.p.axes: expected a list of axes"),
    ({"axes": AXES, "bases": {"p": {"sett": []}}}, "ablate.bases.p.sett: unknown key"),
])
def test_bad_axes_and_bases_are_named_in_the_error(section, message):
    with pytest.raises(ConfigError, match=message):
        plan(build(AblationConfig, section, "params.yaml: ablate"), PARAMS)


def _run(name, variant, seed, miou, changed="(base)", base="this-world", **axes):
    from types import SimpleNamespace

    params = {"variant": variant, "seed": str(seed), "base": base, "changed": changed,
              **{f"axis.{k}": v for k, v in axes.items()}}
    return SimpleNamespace(info=SimpleNamespace(status="FINISHED", start_time=seed * 1000 + len(variant),
                                                end_time=seed * 1000 + len(variant) + 300_000, run_name=name),
                           data=SimpleNamespace(params=params, tags={}, metrics={
                               "miou_test": miou, "final/steps": 625.0, "synth_test/all_background_miou": 6.77}))


def test_the_report_gives_mean_spread_seeds_and_the_papers_direction():
    runs = [_run(f"b{s}", "this-world/baseline", s, m, assignment="soft") for s, m in enumerate([60.0, 64.0, 62.0])]
    runs += [_run(f"h{s}", "this-world/assignment-hard", s, m, "assignment", assignment="hard")
             for s, m in enumerate([50.0, 52.0, 54.0])]
    stats = collect(runs, ["this-world/baseline", "this-world/assignment-hard"])
    assert [s.name for s in stats] == ["this-world/baseline", "this-world/assignment-hard"]
    assert stats[0].mean("miou_test") == 62.0 and stats[0].std("miou_test") == 2.0
    text = markdown(stats, "miou_test", "Budget.", "Time.")
    assert "| baseline | 62.00 ± 2.00 | 60.0 / 64.0 / 62.0 | - |" in text
    assert "| assignment-hard | 52.00 ± 2.00 | 50.0 / 52.0 / 54.0 | -10.00 |" in text and "| better |" in text
    verdict = verdicts(stats, "miou_test")
    assert len(verdict) == 1 and "the opposite of the paper" in verdict[0] and "-10.00" in verdict[0]
    assert "| all background (for scale) | 6.77 |" in text and "all-background level" not in verdict[0]
    # a variant no further above predicting background everywhere than its seeds spread has not learned to segment
    stuck = [_run(f"o{s}", "this-world/multi_label-off", s, m, "multi_label", assignment="soft", multi_label="off")
             for s, m in enumerate([7.0, 8.0, 7.5])]
    for r in runs[:3]:
        r.data.params["axis.multi_label"] = "image"
    verdict = verdicts(collect(runs[:3] + stuck), "miou_test")
    assert "the paper's direction" in verdict[0] and "`multi_label-off` stays at the all-background level (6.77)" \
        in verdict[0] and "`baseline`" not in verdict[0]
    assert "Unfinished: 6 of the 8 planned jobs" in _timing(runs, stats, planned=8)
    assert "Unfinished" not in _timing(runs, stats, planned=6) and "6 jobs (2 variants)" in _timing(runs, stats)
    assert "other MLflow stores" not in _timing(runs, stats)
    assert "1 job (1 variant)" in _timing(runs[:1], stats[:1])
    runs[0].data.tags["groupvit.restored_from"] = "metrics/ablation/this-world/baseline/seed0.json"
    assert "1 of the jobs ran in other MLflow stores" in _timing(runs, stats)
    # the paper found the multi-label loss helps, matched to the image; it never compared that with a segment match
    assert paper_sign("multi_label", "off", "segment") == -1 and paper_sign("multi_label", "segment", "off") == 1
    assert paper_sign("multi_label", "image", "segment") == 0 and paper_sign("group_residual", "1.0", "0.3") == 0
    assert paper_sign("group_tokens", "8", "16") == -1
    assert "625 training steps" in _budget(runs, []) and "(the default pipeline's own length)" in _budget(runs, [])
    shortened = _budget(runs, ["train.steps=625", "model.depths=[2]"])  # `ablate.set`: not the default length
    assert "(with the study's overrides of every job: `train.steps=625`)" in shortened and "default" not in shortened
    one_seed = collect(runs[:1] + runs[3:4], ["this-world/baseline", "this-world/assignment-hard"])
    verdict = verdicts(one_seed, "miou_test")  # 60 -> 50 from one run each: no spread to judge it by
    assert len(verdict) == 1 and "single seed, not yet a finding" in verdict[0] and "opposite" not in verdict[0]


def test_the_cli_lists_the_variants_of_the_project_params(capsys):
    params = str(ROOT / "params.yaml")
    assert ablate_stage.main(["--params", params, "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    expected = plan(load_section(AblationConfig, params, "ablate"), yaml.safe_load(open(params)))
    assert [line.split()[0] for line in out[:-1]] == [v.name for v in expected]
    assert out[0].startswith("this-world/baseline ") and out[-1].endswith(f"= {3 * len(expected)} jobs")
    assert ablate_stage.main(["--params", params, "--list", "--only", "nope"]) == 2


@pytest.mark.slow
def test_a_study_resumes_after_an_interruption_and_reruns_only_what_changed(tmp_path):
    """Two variants x two seeds of the real stages on the tiny project: interrupted after two jobs, then continued by
    the Prefect `ablation` flow after one variant's override changed: the other variant's finished job is not rerun,
    the changed one is (its old run marked superseded); `--report` writes the report from the MLflow runs alone."""
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.ablation import AblationRunner
    from pipelines.flows import ablation

    repo = built_project_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ablate"].update(seeds=[0, 1], bases={"this-world": []}, axes={
        "assignment": {"soft": "model.hard_assignment=false", "hard": "model.hard_assignment=true"}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")

    def children() -> dict[str, list]:
        exp = client.get_experiment_by_name("groupvit-ablation")
        found: dict[str, list] = {}
        for run in client.search_runs([exp.experiment_id], "tags.`groupvit.ablation` = 'job'"):
            found.setdefault(run.info.run_name, []).append(run)
        return found

    with pytest.raises(KeyboardInterrupt):  # a study stopped after its first two jobs (seed 0 of each variant)
        with AblationRunner.open(repo) as runner:
            assert [j.name for j in runner.jobs] == ["this-world/baseline/seed0", "this-world/assignment-hard/seed0",
                                                     "this-world/baseline/seed1", "this-world/assignment-hard/seed1"]
            first = [runner.run_job(j) for j in runner.jobs[:2]]
            raise KeyboardInterrupt
    assert [r["status"] for r in first] == ["FINISHED", "FINISHED"]
    parent_id = runner.parent_id
    assert client.get_run(parent_id).info.status == "FAILED"

    # while it was stopped, the hard variant's override changed: that variant reruns, the baseline does not
    params["ablate"]["axes"]["assignment"]["hard"] = ["model.hard_assignment=true", "train.lr=0.002"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=120):
        state = ablation(workdir=str(repo), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["parent_run_id"] == parent_id and summary["failed"] == []  # the same study, continued
    assert [r["reused"] for r in summary["results"]] == [True, False, False, False]
    runs = children()
    assert sorted(runs) == ["this-world/assignment-hard/seed0", "this-world/assignment-hard/seed1",
                            "this-world/baseline/seed0", "this-world/baseline/seed1"]
    assert {n: len(v) for n, v in runs.items() if len(v) != 1} == {"this-world/assignment-hard/seed0": 2}
    assert runs["this-world/baseline/seed0"][0].info.run_id == first[0]["run_id"]  # reused, not rerun
    hard = runs["this-world/assignment-hard/seed0"]
    superseded = {r.info.run_id: r.data.tags.get("groupvit.superseded", "") for r in hard}
    assert superseded == {first[1]["run_id"]: "true", summary["results"][1]["run_id"]: ""}
    child = runs["this-world/assignment-hard/seed1"][0]
    folder = repo / "data/ablation/this-world/assignment-hard/seed1"
    expected = json.loads((folder / "metrics/evaluate.json").read_text())["synth_test"]["groupvit"]["miou"]
    assert child.data.metrics["miou_test"] == pytest.approx(expected) and "group_oracle" in child.data.metrics
    assert child.data.params["axis.assignment"] == "hard" and child.data.params["seed"] == "1"
    assert len(client.get_metric_history(child.info.run_id, "loss")) == 2  # logged per step by the train stage
    table = (repo / "data/ablation/table.md").read_text()
    assert "| baseline |" in table and "| assignment-hard |" in table and " ± " in table
    baseline = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    assert float(baseline.split("|")[8]) > 0  # the final loss column, read from the children's final/final_loss
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"table.md", "chart.png", "report.json", "plan.json"}
    assert client.get_run(parent_id).data.metrics["miou_test_mean/this-world/baseline"] == pytest.approx(
        sum(r[0].data.metrics["miou_test"] for n, r in runs.items() if "baseline" in n) / 2)

    report = tmp_path / "ablations.md"
    assert ablate_stage.main(["--params", str(repo / "params.yaml"), "--report", str(report)]) == 0
    text = report.read_text()
    assert "Generated by `groupvit ablate --report" in text and "4 jobs (2 variants)" in text
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert len(client.search_model_versions("name='groupvit'")) == 1  # the pipeline's model; jobs never register

    # the records (metrics/ablation, for git) continue the study in another MLflow store with no job folder: the
    # four jobs are restored as FINISHED children with their figures and times, none runs again
    records = repo / "metrics/ablation"
    assert sorted(p.relative_to(records).as_posix() for p in records.rglob("*.json")) == [
        "this-world/assignment-hard/seed0.json", "this-world/assignment-hard/seed1.json",
        "this-world/baseline/seed0.json", "this-world/baseline/seed1.json"]
    current = {n: next(r for r in v if r.data.tags.get("groupvit.superseded") != "true") for n, v in children().items()}
    shutil.rmtree(repo / "data/ablation")
    params["tracking"]["uri"] = f"sqlite:///{repo / 'elsewhere.db'}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ablate_stage.main(["--params", str(repo / "params.yaml")]) == 0
    assert not (repo / "data/ablation/this-world/baseline/seed0").exists()  # no job ran
    client = mlflow.MlflowClient(params["tracking"]["uri"])
    restored = children()
    assert sorted(restored) == sorted(current) and all(len(v) == 1 for v in restored.values())
    for name, (run,) in restored.items():
        before = current[name]
        assert run.info.status == "FINISHED" and run.data.tags["groupvit.restored_from"].startswith("metrics/ablation/")
        assert run.data.metrics["miou_test"] == before.data.metrics["miou_test"]
        assert run.data.params == before.data.params
        assert run.data.tags["groupvit.key"] == before.data.tags["groupvit.key"]
        assert (run.info.start_time, run.info.end_time) == (before.info.start_time, before.info.end_time)
    assert ablate_stage.main(["--params", str(repo / "params.yaml"), "--report", str(report)]) == 0
    assert "4 jobs (2 variants)" in report.read_text()
