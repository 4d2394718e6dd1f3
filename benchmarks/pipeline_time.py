"""The pipeline's wall time per stage: what the stages recorded in metrics/, or a timed `make repro` in a fresh clone.

    .venv/bin/python benchmarks/pipeline_time.py            # read metrics/ of this checkout (seconds, no run)
    .venv/bin/python benchmarks/pipeline_time.py --clone    # clone HEAD to a temporary folder and time, there,
                                                            # `make install`, `make repro`, and `make repro` again

Without `--clone` the figures are the stages' own timings from the last `dvc repro` whose metrics were committed
(download and nouns `seconds`, train and train_baseline `wall_s`, each evaluation loop's images / images_per_s), so
they were measured on whatever machine ran that `dvc repro`: the file names the commit and date of metrics/, and its
machine record is the reader's. The synth stage records no timing; `--clone` measures it with every other stage.

`--clone` clones the committed HEAD (uncommitted changes are not in it; needs the package registry for the install)
and times each `make` target; a stage's wall time runs from DVC's "Running stage" line to the next one or to the end
of `dvc repro`, so it includes DVC's hashing and caching of the stage's outputs. The clone's own metrics/ give the
rates. The clone is deleted afterwards (`--keep` keeps it). An idle machine is needed for figures worth quoting: a
run takes about 15 minutes on 2 cores. A failed `make` keeps the clone to look into.

Figures: benchmarks/results/pipeline_time.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _results import ROOT, Run, parse_args, timed

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def metrics_rows(metrics: Path) -> list[dict[str, Any]]:
    """One row per timed stage (or evaluation loop) from the stages' metrics files; absent files are left out.

    Args:
        metrics: a metrics/ folder (download.json, nouns.json, train.json, baseline/train.json, evaluate.json).
    """
    rows: list[dict[str, Any]] = []
    if d := _json(metrics / "download.json"):
        rows.append({"stage": "download", "seconds": d.get("seconds"), "rate": d.get("images_per_s"),
                     "unit": "images/s", "note": f"{d.get('count') or 0:,} images"})
    if d := _json(metrics / "nouns.json"):
        rows.append({"stage": "nouns", "seconds": d.get("seconds"), "rate": d.get("captions_per_s"),
                     "unit": "captions/s (incl. start-up)", "note": f"{d.get('captions') or 0:,} captions"})
    for stage, path in (("train", metrics / "train.json"), ("train_baseline", metrics / "baseline" / "train.json")):
        if d := _json(path):
            rows.append({"stage": stage, "seconds": d.get("wall_s"), "rate": d.get("images_per_s"),
                         "unit": "images/s", "note": f"{d.get('steps')} steps"
                         + (", stopped by the time budget" if d.get("stopped_by_budget") else "")})
    evaluation = _json(metrics / "evaluate.json") or {}
    for dataset, models in evaluation.items():
        for model, m in (models.items() if isinstance(models, dict) else ()):
            if isinstance(m, dict) and m.get("images_per_s") and m.get("num_images"):
                rows.append({"stage": f"evaluate: {dataset}, {model}", "seconds": m["num_images"] / m["images_per_s"],
                             "rate": m["images_per_s"], "unit": "images/s (segmentation loop)",
                             "note": f"{m['num_images']:,} images"})
    return rows


def stage_seconds(lines: Iterable[tuple[float, str]], end: float) -> dict[str, float]:
    """Wall seconds per DVC stage from timestamped `dvc repro` output lines.

    Args:
        lines: (monotonic time the line was read, line) in order.
        end: the time `dvc repro` ended.

    Returns:
        stage -> seconds from its "Running stage '<stage>'" line to the next such line (or `end`).
    """
    starts = [(t, m.group(1)) for t, line in lines if (m := STAGE_LINE.match(line.strip()))]
    return {name: (starts[i + 1][0] if i + 1 < len(starts) else end) - t for i, (t, name) in enumerate(starts)}


def clone_rows(keep: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Clone HEAD, time `make install`, `make repro` (per stage) and a second `make repro`; rows and figures."""
    work = Path(tempfile.mkdtemp(prefix="groupvit-pipeline-time-"))
    clone = work / "groupvit"
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        rows: list[dict[str, Any]] = []
        figures: dict[str, Any] = {}
        for target, label in (("install", "make install"), ("repro", "make repro"),
                              ("repro", "make repro, again (nothing to do)")):
            rc, seconds, lines, start = timed(["make", target], clone)
            if rc != 0:
                keep = True  # to look into; an interrupted run (Ctrl-C, SIGTERM) removes it
                sys.exit(f"pipeline_time: `make {target}` failed in {clone} (exit {rc})")
            rows.append({"stage": label, "seconds": seconds})
            if label == "make repro":
                for stage, s in stage_seconds(lines, start + seconds).items():
                    rows.append({"stage": f"make repro: stage {stage}", "seconds": s})
        measured = {r["stage"]: r["seconds"] for r in rows}
        for r in metrics_rows(clone / "metrics"):  # the clone's own rates
            rows.append({**r, "stage": f"{r['stage']} (its metrics)"})
        figures["install_and_repro_minutes"] = (measured["make install"] + measured["make repro"]) / 60
        figures["repro_minutes"] = measured["make repro"] / 60
        return rows, figures
    finally:
        if keep:
            print(f"pipeline_time: the clone is kept in {clone}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", default="metrics", help="the metrics folder to read, relative to the repository "
                   "(without --clone)")
    p.add_argument("--clone", action="store_true", help="time make install + make repro in a fresh clone of HEAD")
    p.add_argument("--keep", action="store_true", help="keep the clone (with --clone)")
    args = parse_args(p, None, argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: unwind, so the clone's tree is stopped and removed
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    run = Run("pipeline_time", args)
    if args.clone:
        rows, figures = clone_rows(args.keep)
        source = {"mode": "clone", "commit": _git("rev-parse", "HEAD")}
    else:
        metrics = ROOT / args.metrics  # an absolute --metrics stays itself
        if not metrics.is_dir():
            print(f"error: {metrics}: no such metrics folder (run `make repro` first, or pass --metrics DIR)",
                  file=sys.stderr)
            return 2
        rows = metrics_rows(metrics)
        figures = {"recorded_minutes": sum(r["seconds"] or 0 for r in rows) / 60}
        commit = _git("log", "-1", "--format=%h %cI", "--", str(metrics))
        source = {"mode": "metrics", "metrics_commit": commit.split()[0] if commit else None,
                  "metrics_date": commit.split()[1] if commit else None}
    for r in rows:
        rate = f"  {r['rate']:,.1f} {r['unit']}" if r.get("rate") else ""
        print(f"{r['stage']:<44} {r['seconds'] or 0:8.1f} s{rate}")
    for k, v in figures.items():
        print(f"{k}: {v:.1f}")
    run.write(rows, figures, source=source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
