"""One ablation job against the default pipeline's own training + evaluation of one model, side by side.

    .venv/bin/python benchmarks/ablation_job.py [--steps 0] [--quick]

Both sides run in one temporary folder, on this checkout's pipeline data (`ablate.inputs`: data/synth, data/shards,
data/nouns, linked; run `make repro` first), with this checkout's params.yaml and the same training length:
- pipeline: `groupvit train` then `groupvit evaluate`, the commands of the DVC stages `train` and `evaluate` (no
  baseline model is there, so the evaluation is of the one GroupViT), logging to a scratch MLflow store;
- job: `groupvit ablate --only this-world/baseline` at one seed, which runs the same two commands in its job folder
  as a child run of a parent run, plus its bookkeeping (the job key, the folder, the report at the end). The figure
  is the job's child run (what each job of a study costs); the whole command's time (start-up and report, paid
  once per study) is shown beside it.

`--steps 0` (the default) trains the default length (`train.epochs`), so the figure is the study's real cost per job;
`--steps N` shortens both sides alike. The job's extra cost is fixed (start-up, MLflow), so a short run overstates it.
An idle machine is needed for figures worth quoting: the default length takes about 15 minutes on 2 cores.

Figures: benchmarks/results/ablation_job.json (`benchmarks/_results.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from _results import ROOT, Run, parse_args, timed

INPUTS = ("data/synth", "data/shards", "data/nouns")
BIN = Path(sys.executable).parent  # the venv's console scripts (groupvit) beside its python


def _link_inputs(folder: Path) -> None:
    for rel in INPUTS:
        source = ROOT / rel
        if not source.is_dir():
            sys.exit(f"ablation_job: {source} does not exist; run `make repro` first")
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(source)
    for name in ("params.yaml", "dvc.lock"):  # dvc.lock: the study keys its jobs by the data's DVC hashes
        shutil.copyfile(ROOT / name, folder / name)


def _run(cmd: list[str], cwd: Path) -> float:
    rc, seconds, _, _ = timed(cmd, cwd)
    if rc != 0:
        sys.exit(f"ablation_job: {' '.join(cmd)} failed in {cwd} (exit {rc})")
    return seconds


def _train_seconds(metrics: Path) -> float:
    return json.loads((metrics / "train.json").read_text())["wall_s"]


def _child_seconds(uri: str) -> float:
    """Wall seconds of the study's one job run, from its MLflow child run: what each further job of a study costs
    (the study's start-up and its report at the end are paid once per study)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("groupvit-ablation")
    (child,) = client.search_runs([exp.experiment_id], "tags.`groupvit.ablation` = 'job'")
    return (child.info.end_time - child.info.start_time) / 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=0, help="training steps of both sides (0 = the default length)")
    args = parse_args(p, {"steps": 20}, argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: unwind, so the children stop and the folder goes
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    run = Run("ablation_job", args)
    work = Path(tempfile.mkdtemp(prefix="groupvit-ablation-job-"))
    groupvit = str(BIN / "groupvit")
    length = [f"train.steps={args.steps}"] if args.steps else []
    try:
        pipeline, job = work / "pipeline", work / "study"
        for folder in (pipeline, job):
            _link_inputs(folder)
        sets = [a for s in (*length, f"tracking.uri=sqlite:///{pipeline / 'mlflow.db'}") for a in ("--set", s)]
        train_s = _run([groupvit, "train", "--params", "params.yaml", *sets], pipeline)
        eval_s = _run([groupvit, "evaluate", "--params", "params.yaml", *sets], pipeline)
        study = ["--set", "ablate.seeds=[0]", "--set", f"ablate.set={json.dumps(length)}", "--set",
                 "ablate.experiment=groupvit-ablation", "--set",
                 f"tracking.uri=sqlite:///{job / 'mlflow.db'}", "--only", "this-world/baseline"]
        job_s = _run([groupvit, "ablate", "--params", "params.yaml", *study], job)
        folder = job / "data/ablation/this-world/baseline/seed0"
        child = _child_seconds(f"sqlite:///{job / 'mlflow.db'}")
        rows = [{"variant": "pipeline: train + evaluate", "seconds": train_s + eval_s,
                 "train_s": _train_seconds(pipeline / "metrics"), "evaluate_s": eval_s},
                {"variant": "groupvit ablate, a study of this one job", "seconds": job_s,
                 "train_s": _train_seconds(folder / "metrics"), "evaluate_s": None},
                {"variant": "its job's child run (start to end)", "seconds": child,
                 "train_s": _train_seconds(folder / "metrics"), "evaluate_s": None}]
        plain = train_s + eval_s
        figures = {"job_vs_pipeline": child / plain, "study_of_one_vs_pipeline": job_s / plain,
                   "steps": json.loads((folder / "metrics/train.json").read_text())["steps"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        print(f"{r['variant']:<44} {r['seconds']:8.1f} s  (its training loop {r['train_s']:.1f} s)")
    print(f"job / pipeline: {figures['job_vs_pipeline']:.3f} (a study of one job: "
          f"{figures['study_of_one_vs_pipeline']:.3f}) at {figures['steps']} steps")
    run.write(rows, figures)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
