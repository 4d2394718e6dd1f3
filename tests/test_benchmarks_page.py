"""benchmarks/: the results files the scripts write (machine, versions, load) and docs/benchmarks.md made from them.

No speed is asserted anywhere: the quick runs only check that a script runs end to end and writes a valid file.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package: it is imported from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import _results, page  # noqa: E402


def _bench(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_committed_benchmarks_page_is_what_the_generator_makes_of_the_committed_results():
    """docs/benchmarks.md cannot drift from benchmarks/results/: after a benchmark run, `make docs` must be rerun."""
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert committed == page.render(ROOT / "benchmarks" / "results"), (
        "docs/benchmarks.md differs from what benchmarks/results/ give: regenerate it with `make docs` "
        "(.venv/bin/python -m benchmarks.page)")


def test_every_benchmark_script_has_a_section_on_the_page():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_") and p.stem != "page"}
    scripts |= {p.stem for p in (ROOT / "benchmarks").glob("*.sh")}
    assert scripts == {b.name for b in page.BENCHMARKS}, "add the benchmark to benchmarks/page.py BENCHMARKS"


def test_the_benchmarks_page_has_no_session_diary():
    """History stays in git and the experiment records: the page names no sessions."""
    assert not re.search(r"\bsessions? \d", (ROOT / "docs" / "benchmarks.md").read_text(), re.IGNORECASE)


def test_the_machine_record_has_its_fields():
    m = _results.machine()
    assert set(_results.MACHINE_FIELDS) <= set(m)
    assert m["cpu"] and isinstance(m["cpu"], str)
    assert 1 <= m["cores_usable"] <= m["cores_total"]
    assert m["memory_gib"] > 0
    assert m["python"] == ".".join(map(str, sys.version_info[:3]))
    assert m["packages"]["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert m["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", m["git_commit"])
    assert m["git_dirty"] in (True, False, None)
    json.dumps(m)  # it goes into a JSON file as it is


def test_quick_sizes_are_defaults_that_the_command_line_overrides():
    import argparse

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.add_argument("--n", type=int, default=1000)
        p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
        return p

    quick = {"n": 10, "sizes": [64]}
    args = _results.parse_args(parser(), quick, [])
    assert (args.quick, args.n, args.sizes) == (False, 1000, [64, 96])
    args = _results.parse_args(parser(), quick, ["--quick", "--n", "20"])
    assert (args.quick, args.n, args.sizes) == (True, 20, [64])


def test_a_quick_run_writes_a_valid_results_file_that_the_page_shows(tmp_path):
    """The cheapest benchmark end to end (seconds): a file with the record's fields, marked quick, on the page."""
    out = tmp_path / "results"
    printed = _bench("synth_speed.py", "--quick", "--n", "10", "--write-n", "20", "--voc-n", "5",
                     "--results-dir", str(out)).stdout
    assert "write_world w1" in printed  # the printed table is kept
    # the command line's sizes win over the quick ones, the rest are the quick sizes
    expected = {"synth_speed": (5, {"n": 10, "write_n": 20, "voc_n": 5, "sizes": [64], "workers": [1]})}
    for name, (rows, options) in expected.items():
        data = page.read_result(out / f"{name}.json")
        assert data is not None and data["benchmark"] == name and data["quick"] is True
        assert len(data["rows"]) == rows
        assert {k: data["options"][k] for k in options} == options and "results_dir" not in data["options"]
        assert "--quick" in data["command"] and data["command"].startswith(f"python benchmarks/{name}.py")
        assert set(data["load"]) == {"start", "end"} and set(_results.MACHINE_FIELDS) <= set(data["machine"])
    text = page.render(out)
    synth = text.split("## Synthetic world: generation speed")[1].split("\n## ")[0]
    assert "**quick run**" in synth and "| 64 | write_world w1 |" in synth
    assert "`python benchmarks/synth_speed.py --quick" in synth
    assert "`benchmarks/results/eval_throughput.json`): not run yet" in text
    # a new benchmark's file before its section exists is shown too, under its name
    (out / "new_bench.json").write_text((out / "synth_speed.json").read_text())
    new = page.render(out).split("## `new_bench`")[1]
    assert "add it to `BENCHMARKS`" in new and "| 64 | write_world w1 |" in new


def test_pipeline_time_reads_the_stage_timings_from_a_metrics_folder(tmp_path):
    metrics = tmp_path / "metrics"
    (metrics / "baseline").mkdir(parents=True)
    (metrics / "download.json").write_text(json.dumps({"count": 100, "seconds": 4.0, "images_per_s": 25.0}))
    (metrics / "nouns.json").write_text(json.dumps({"captions": 100, "seconds": 2.0, "captions_per_s": 50.0}))
    (metrics / "train.json").write_text(json.dumps({"steps": 10, "wall_s": 30.0, "images_per_s": 21.3}))
    (metrics / "baseline" / "train.json").write_text(json.dumps({"steps": 10, "wall_s": 20.0, "images_per_s": 32.0}))
    (metrics / "evaluate.json").write_text(json.dumps({"synth_test": {"groupvit": {"images_per_s": 50.0,
                                                                                   "num_images": 100}},
                                                       "comparison": {"synth_test": {"x": 1.2}}}))
    _bench("pipeline_time.py", "--metrics", str(metrics), "--results-dir", str(tmp_path))
    data = page.read_result(tmp_path / "pipeline_time.json")
    assert [(r["stage"], r["seconds"]) for r in data["rows"]] == [
        ("download", 4.0), ("nouns", 2.0), ("train", 30.0), ("train_baseline", 20.0),
        ("evaluate: synth_test, groupvit", 2.0)]
    assert data["figures"]["recorded_minutes"] == pytest.approx(58 / 60, rel=1e-3) and data["quick"] is False


def test_pipeline_time_splits_dvc_output_into_stages():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from pipeline_time import stage_seconds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    lines = [(0.0, "Verifying data sources\n"), (1.0, "Running stage 'synth':\n"), (3.0, "> groupvit synth\n"),
             (11.0, "Running stage 'download':\n"), (41.0, "Updating lock file 'dvc.lock'\n")]
    assert stage_seconds(lines, end=42.5) == {"synth": 10.0, "download": 31.5}


def test_a_bad_or_unknown_results_file_stops_the_page_with_its_name(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "synth_speed.json").write_text(json.dumps({"date": "2026-01-01T00:00:00Z", "command": "x"}))
    args = ["--results", str(results), "--out", str(tmp_path / "benchmarks.md")]
    assert page.main(args) == 2
    assert "synth_speed.json: key 'machine' missing" in capsys.readouterr().err
    (results / "synth_speed.json").unlink()
    (results / "mystery.json").write_text("{}")
    assert page.main(args) == 2
    assert "mystery.json: key 'date' missing" in capsys.readouterr().err  # a file no section names is read too
    (results / "mystery.json").unlink()
    assert page.main(args + ["--check"]) == 1  # no page yet
    assert page.main(args) == 0 and page.main(args + ["--check"]) == 0
    assert "not run yet" in (tmp_path / "benchmarks.md").read_text()


@pytest.mark.parametrize("text", ["steps 1. and 2. then", "the cost + RandAugment - erasing"])
def test_wrapped_page_lines_never_start_a_markdown_block(text):
    """A line starting with `2.`, `+` or `-` would turn the rest of a paragraph into a list."""
    long = " ".join(f"{text} {i}" for i in range(60))
    lines = page._para(long).splitlines()
    assert " ".join(lines) == long
    assert not any(page._BLOCK_START.match(line) for line in lines[1:])
