"""pipelines.report: the mIoU headline and the generated docs/results.md (deterministic, in step with metrics/)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines import report

ROOT = Path(__file__).resolve().parents[1]


def _write_metrics(folder: Path, *, baseline: bool) -> Path:
    """A small metrics/ folder as the pipeline writes it; without the baseline when `baseline` is False."""
    models = {"groupvit": {"miou": 61.25, "pixel_accuracy": 80.5, "bg_thresh": 0.9, "oracle_miou": 77.0,
                           "groups_per_image": 7.5, "num_images": 4}}
    if baseline:
        models["vit_pixelwise"] = {"miou": 50.0, "pixel_accuracy": 79.0, "bg_thresh": 0.8, "num_images": 4}
    val = {name: dict(m, best_miou=m["miou"] + 1, best_bg_thresh=m["bg_thresh"],
                      sweep={"0.5": 40.0, "1": 10.0, str(m["bg_thresh"]): m["miou"] + 1}) for name, m in models.items()}
    evaluate = {"synth_val": {**val, "all_background_miou": 6.5}, "synth_test": {**models, "all_background_miou": 6.75},
                "classification": {"synth_single_object": {n: {"top1": 75.0, "top5": 100.0, "num_images": 4}
                                                           for n in models}}}
    if baseline:
        evaluate["comparison"] = {"synth_test": {"groupvit_over_vit_pixelwise": 1.225}}
    folder.mkdir(parents=True)
    (folder / "evaluate.json").write_text(json.dumps(evaluate))
    columns = list(models)
    (folder / "per_class_iou.csv").write_text(",".join(["class", *columns]) + "\n"
                                              + "".join(f"{c},{','.join('33.5' for _ in columns)}\n"
                                                        for c in ("background", "tomato")))
    train = {"final_loss": 21.5, "steps": 10, "planned_steps": 10, "images_per_s": 100.0, "wall_s": 3.0,
             "stopped_by_budget": False, "world_size": 1, "global_batch": 8}
    (folder / "train.json").write_text(json.dumps(train))
    if baseline:
        (folder / "baseline").mkdir()
        (folder / "baseline" / "train.json").write_text(json.dumps(dict(train, final_loss=5.25)))
    (folder / "download.json").write_text(json.dumps({"count": 12, "successes": 11, "failed_to_download": 1,
                                                      "failed_to_resize": 0, "success_rate": 11 / 12,
                                                      "failures_by_reason": {"HTTP Error 404": 1}, "shards": 2}))
    (folder / "nouns.json").write_text(json.dumps({"captions": 11, "mean_words": 3.0, "no_words": 1,
                                                   "spacy_model": "en_core_web_sm"}))
    return folder


def test_the_page_is_the_same_bytes_for_the_same_metrics_wherever_and_whenever_generated(tmp_path):
    """No date, commit or path in the page: two copies of the same metrics in other folders give identical bytes."""
    a = _write_metrics(tmp_path / "a" / "metrics", baseline=True)
    b = tmp_path / "elsewhere" / "m"
    shutil.copytree(a, b)
    out_a, out_b = tmp_path / "a.md", tmp_path / "b.md"
    assert report.main([str(a / "evaluate.json"), "--markdown", str(out_a)]) == 0
    assert report.main([str(b / "evaluate.json"), "--markdown", str(out_b)]) == 0
    assert out_a.read_bytes() == out_b.read_bytes()
    text = out_a.read_text()
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date in the generated page"
    assert str(tmp_path) not in text
    # The figures are on the page, from the files they come from.
    assert "| `groupvit` | **61.25** |" in text and "| `vit_pixelwise` | **50.00** |" in text
    assert "`groupvit` / `vit_pixelwise`: **1.225**" in text
    assert "| all background (for scale) | 6.75 |" in text
    assert "| `groupvit` | 10 | 10 |" in text and "| 21.5000 |" in text and "| 5.2500 |" in text
    assert "| failures: HTTP Error 404 | 1 |" in text and "| success rate | 91.67 % |" in text


def test_a_model_that_was_not_evaluated_is_left_out_and_said_so(tmp_path, capsys):
    metrics = _write_metrics(tmp_path / "metrics", baseline=False)
    text = report.results_markdown(metrics)
    assert "| `groupvit` | **61.25** |" in text
    assert "vit_pixelwise" not in text
    assert "No mIoU ratio recorded" in text
    assert "_`metrics/baseline/train.json` not found: that training stage has not run._" in text
    # The headline of `make repro` still prints what there is.
    assert report.main([str(metrics / "evaluate.json")]) == 0
    out = capsys.readouterr().out
    assert "synth_test mIoU  groupvit        61.25 %  (bg_thresh 0.9)" in out and "ratio" not in out


def test_bad_metrics_stop_with_a_line_naming_the_file_and_key(tmp_path, capsys):
    metrics = _write_metrics(tmp_path / "metrics", baseline=True)
    (metrics / "train.json").write_text(json.dumps({"steps": "many"}))
    assert report.main([str(metrics / "evaluate.json"), "--markdown", str(tmp_path / "r.md")]) == 2
    assert "error: metrics/train.json: steps: expected a number, found 'many'" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()
    (metrics / "train.json").write_text("{")
    assert report.main([str(metrics / "evaluate.json"), "--markdown", str(tmp_path / "r.md")]) == 2
    assert "error: metrics/train.json: not valid JSON" in capsys.readouterr().err
    assert report.main([str(metrics / "evaluate.json"), "--markdown", str(tmp_path / "r.md"),
                        "--dataset", "voc"]) == 2
    assert "no data set 'voc'" in capsys.readouterr().err


def test_check_says_whether_the_page_is_stale(tmp_path, capsys):
    metrics = _write_metrics(tmp_path / "metrics", baseline=True)
    page = tmp_path / "results.md"
    args = [str(metrics / "evaluate.json"), "--markdown", str(page)]
    assert report.main(args + ["--check"]) == 1  # no page yet
    assert report.main(args) == 0
    assert report.main(args + ["--check"]) == 0
    (metrics / "nouns.json").write_text(json.dumps({"captions": 12}))
    assert report.main(args + ["--check"]) == 1
    assert "out of date" in capsys.readouterr().err


def test_the_committed_results_page_is_what_the_generator_makes_of_the_committed_metrics():
    """docs/results.md cannot drift from metrics/: after a pipeline run, `make docs` must be rerun."""
    expected = report.results_markdown(ROOT / "metrics")
    committed = (ROOT / "docs" / "results.md").read_text()
    assert committed == expected, ("docs/results.md differs from what metrics/ give: regenerate it with `make docs` "
                                   "(.venv/bin/python -m pipelines.report --markdown docs/results.md)")


@pytest.mark.parametrize("name", ["evaluation.md", "method.md", "results.md"])
def test_the_topic_docs_have_no_session_diary(name):
    """History stays in git: the docs by topic name no sessions."""
    text = (ROOT / "docs" / name).read_text()
    assert not re.search(r"\bsessions? \d", text, re.IGNORECASE)
