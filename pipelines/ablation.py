"""The paper's ablations as train+evaluate jobs over bases, axes and seeds: one MLflow parent, one child per job.

The `ablate:` section of params.yaml:

    ablate:
      seeds: [0, 1, 2]                 # every variant runs once per seed (the replicates of the report)
      bases:                           # what the axes are varied from, one at a time (the paper's tables)
        this-world: []                 # params.yaml as it is
        paper: {set: [model.hard_assignment=true, ...], axes: [assignment, stages]}
      axes:                            # axis -> {value label: override(s)}
        assignment: {soft: model.hard_assignment=false, hard: model.hard_assignment=true}

A *variant* is a base with at most one axis changed (`mode: grid`: every combination); a label whose overrides leave
the base's resolved configuration as it is names the base's own value and is not run again. A *job* is a variant at
one seed. Each job runs the same `groupvit train` and `groupvit evaluate` commands as the DVC stages inside
`<out_dir>/<base>/<variant>/seed<k>/` (the pipeline's data linked in), logging into its child run (`MLFLOW_RUN_ID`).

Resumable: a job's key is the hash of everything that decides its result (the resolved sections the stages read,
the pipeline data it reads, the seed). A rerun of the study (the parent run of `ablate.study`) skips the jobs whose
child run FINISHED with the same key and whose folder holds that key and its metrics; an interrupted job continues
in its child run from its checkpoints; a job whose key changed (an override, the budget, the data) runs afresh and
its old child is tagged superseded. `pipelines.ablation_report` turns the children into the report.

Records: each finished job also leaves `<records>/<base>/<variant>/seed<k>.json` (its key, params, final metrics,
non-system tags, start and end time), small files meant for git. A study run on another machine, or one whose MLflow
store is gone, restores a job whose record holds its current key as a FINISHED child run (tagged
`groupvit.restored_from`) instead of rerunning it; merging the records of several machines through git merges their
studies. The restored child has the final value of each metric, not its history (the loss curve stays in the store
that ran it).
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_write
from groupvit.config import apply_overrides, load_section, read_params
from groupvit.errors import ConfigError
from pipelines.config import AblationConfig
from pipelines.tracking import TrackingConfig, dvc_data_hashes, git_commit, resolve_uri, setup
from pipelines.workspace import run_streaming, tool_env

# The sections `groupvit train` and `groupvit evaluate` read: a job's result is decided by these (and its data).
JOB_SECTIONS = ("base", "model", "data", "train", "evaluate")
KEY_FILE = ".ablation-key"  # in a job folder: the key of the job whose outputs it holds
PARENT_TAG, KIND_TAG, KEY_TAG = "groupvit.study", "groupvit.ablation", "groupvit.key"
RESTORED_TAG = "groupvit.restored_from"  # on a child run rebuilt from a record: the record's path
# tags of a run that are not carried into its record: MLflow's own, and the study's bookkeeping of that store
UNRECORDED_TAGS = ("groupvit.superseded", "error")


@dataclass(frozen=True)
class Variant:
    """A base with its axis labels: `name` is `<base>/baseline` or `<base>/<axis>-<label>`."""

    name: str
    base: str
    axes: dict[str, str]  # axis -> the label this variant takes ("base" where no label equals the base's value)
    changed: tuple[str, ...]  # the axes this variant changes from its base
    overrides: tuple[str, ...]  # the base's overrides, then the changed axes' ones


@dataclass(frozen=True)
class Job:
    """One child run: a variant at one seed."""

    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*self.variant.overrides, f"base.seed={self.seed}")


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
        raise ConfigError(f"{where}: expected 'section.key=value' or a list of them, found {value!r}")
    return tuple(items)


def _axes(cfg: AblationConfig) -> dict[str, dict[str, tuple[str, ...]]]:
    """Validate `ablate.axes` into {axis: {label: overrides}}."""
    if not isinstance(cfg.axes, dict) or not cfg.axes:
        raise ConfigError(f"ablate.axes: expected a mapping of axis name -> {{value label: overrides}}, found "
                          f"{cfg.axes!r}")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for axis, values in cfg.axes.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"ablate.axes.{axis}: expected a mapping of value label -> overrides, found {values!r}")
        out[str(axis)] = {str(label): _overrides(o, f"ablate.axes.{axis}.{label}") for label, o in values.items()}
    return out


def _bases(cfg: AblationConfig, axes: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Validate `ablate.bases` into {base: (overrides, axes varied from it)}; a list value means every axis."""
    bases = cfg.bases if cfg.bases is not None else {"this-world": []}
    if not isinstance(bases, dict) or not bases:
        raise ConfigError(f"ablate.bases: expected a mapping of base name -> overrides or {{set, axes}}, found "
                          f"{bases!r}")
    out = {}
    for name, spec in bases.items():
        where = f"ablate.bases.{name}"
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"set", "axes"})
            if unknown:
                raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: axes, set)")
            overrides, varied = _overrides(spec.get("set", []), f"{where}.set"), spec.get("axes", list(axes))
        else:
            overrides, varied = _overrides(spec, where), list(axes)
        if not isinstance(varied, list) or any(a not in axes for a in varied):
            raise ConfigError(f"{where}.axes: expected a list of axes of ablate.axes ({', '.join(axes)}), found "
                              f"{varied!r}")
        out[str(name)] = (overrides, tuple(varied))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", text.lower()).strip("-.") or "x"


def resolved(params: dict[str, Any], overrides: tuple[str, ...]) -> dict[str, Any]:
    """The sections a job's stages read, after `overrides` (what decides its result, with its data)."""
    raw = apply_overrides(json.loads(json.dumps(params)), overrides, "params.yaml")
    return {s: raw.get(s) for s in JOB_SECTIONS}


def plan(cfg: AblationConfig, params: dict[str, Any]) -> list[Variant]:
    """The variants to run, each base's own point first.

    Args:
        cfg: the `ablate` section.
        params: the project's params.yaml (before the variants' overrides), to tell which labels change a base.

    one_at_a_time: each base, then each label of each axis varied from it that changes the base's resolved
    configuration. grid: every combination of those labels per base. The shared `ablate.set` is not part of the
    variants (every job gets it first).
    """
    axes = _axes(cfg)
    variants, seen = [], set()
    for base, (base_set, varied) in _bases(cfg, axes).items():
        here = resolved(params, base_set)
        own = {}  # the label of each axis that the base already has (its overrides change nothing)
        for axis, labels in axes.items():
            own[axis] = next((label for label, o in labels.items() if resolved(params, (*base_set, *o)) == here),
                             "base")
        if cfg.mode == "grid":
            combos = itertools.product(*([(a, lab) for lab in axes[a]] for a in varied))
            points = [dict(c) for c in combos]
        else:
            points = [{}] + [{axis: label} for axis in varied for label in axes[axis]]
        for point in points:
            point = {a: lab for a, lab in point.items() if lab != own[a]}
            overrides = (*base_set, *(o for a, lab in point.items() for o in axes[a][lab]))
            effective = json.dumps(resolved(params, overrides), sort_keys=True)
            if (base, effective) in seen:
                continue  # the same configuration as a variant already planned (a label equal to another's)
            seen.add((base, effective))
            name = "_".join(f"{a}-{lab}" for a, lab in point.items()) or "baseline"
            variants.append(Variant(f"{base}/{_slug(name)}", base, {**own, **point}, tuple(point), overrides))
    return variants


def jobs(cfg: AblationConfig, variants: list[Variant]) -> list[Job]:
    """Seed-major order: every variant at the first seed, then the next seed, so a study stopped early still has
    every variant once."""
    if not cfg.seeds:
        raise ConfigError("ablate.seeds: expected at least one seed")
    return [Job(v, s) for s in cfg.seeds for v in variants]


def job_key(job: Job, shared: tuple[str, ...], params: dict[str, Any], data: dict[str, str]) -> str:
    """The hash of what decides a job's result: its resolved sections and the DVC hashes of the data it reads."""
    config = resolved(params, (*shared, *job.overrides))
    blob = json.dumps({"config": config, "data": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class AblationRunner:
    """Runs the jobs of a study as child runs of one MLflow parent run; see the module docstring."""

    def __init__(self, workdir: Path, params_file: str, cfg: AblationConfig, tracking: TrackingConfig,
                 only: tuple[str, ...] = (), extra_sets: tuple[str, ...] = (), fresh: bool = False):
        import mlflow

        self.workdir, self.params_file, self.cfg = workdir, params_file, cfg
        self.params = read_params(workdir / params_file)
        self.variants = plan(cfg, self.params)  # the whole study, also when `only` runs a part of it
        self.jobs = [j for j in jobs(cfg, self.variants) if not only or j.variant.name in only]
        self.shared = (*cfg.set, *extra_sets)  # overrides every job gets first: the common budget
        self.data = dvc_data_hashes(cfg.inputs, workdir / "dvc.lock")
        self.keys = {job.name: job_key(job, self.shared, self.params, self.data)
                     for job in jobs(cfg, self.variants)}
        self.tracking = TrackingConfig(uri=resolve_uri(tracking, root=workdir), experiment=cfg.experiment,
                                       registered_model="", system_metrics=False)
        setup(self.tracking, root=workdir)
        self.client = mlflow.MlflowClient(self.tracking.uri)
        self.experiment_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
        self.out = workdir / cfg.out_dir
        self.parent_id = self._open_parent(fresh)

    # ---- the parent run ------------------------------------------------------------------------------------
    def _open_parent(self, fresh: bool) -> str:
        """The study's parent run: the latest one of `ablate.study` (resumed), or a new one."""
        found = [] if fresh else self.client.search_runs(
            [self.experiment_id], f"tags.`{KIND_TAG}` = 'parent' and tags.`{PARENT_TAG}` = '{self.cfg.study}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            parent_id = found[0].info.run_id
            self.client.update_run(parent_id, status="RUNNING")
        else:
            parent_id = self.client.create_run(self.experiment_id, run_name=f"ablation/{self.cfg.study}",
                                               tags={KIND_TAG: "parent", PARENT_TAG: self.cfg.study}).info.run_id
        self.client.set_tag(parent_id, "git_commit", git_commit(self.workdir))
        plan_json = {v.name: {"base": v.base, "axes": v.axes, "changed": list(v.changed),
                              "overrides": list(v.overrides)} for v in self.variants}
        self.client.log_dict(parent_id, {"shared": list(self.shared), "seeds": list(self.cfg.seeds),
                                         "variants": plan_json}, "plan.json")
        return parent_id

    @classmethod
    @contextlib.contextmanager
    def session(cls, *args: Any, **kwargs: Any) -> Iterator[AblationRunner]:
        """`with AblationRunner.session(...) as runner:`; the parent run ends FAILED (resumable) if the body raises,
        FINISHED otherwise."""
        runner = cls(*args, **kwargs)
        try:
            yield runner
        except BaseException:
            runner.client.set_terminated(runner.parent_id, "FAILED")
            raise
        else:
            runner.client.set_terminated(runner.parent_id, "FINISHED")

    @classmethod
    def open(cls, workdir: Path, params_file: str = "params.yaml") -> contextlib.AbstractContextManager[Any]:
        """A session with the `ablate` and `tracking` sections of `workdir/params_file`."""
        params = workdir / params_file
        return cls.session(workdir, params_file, load_section(AblationConfig, params, "ablate"),
                           load_section(TrackingConfig, params, "tracking", required=False))

    # ---- one job ---------------------------------------------------------------------------------------------
    def children(self) -> list[Any]:
        """Every child run of the parent (superseded ones too)."""
        return self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                                       max_results=5000)

    def folder(self, job: Job) -> Path:
        return self.out / job.variant.name / f"seed{job.seed}"

    def done(self, job: Job, child: Any | None, record: dict[str, Any] | None) -> bool:
        """Finished before: its child run FINISHED with this key, and its folder (or its record, `self.record(job)`)
        holds this key and its metrics."""
        folder = self.folder(job)
        return (child is not None and child.info.status == "FINISHED" and (
            record is not None
            or ((folder / KEY_FILE).is_file() and (folder / KEY_FILE).read_text().strip() == self.keys[job.name]
                and (folder / "metrics" / "evaluate.json").is_file())))

    # ---- records: a finished job's result as a small file for git ------------------------------------------
    def record_path(self, job: Job) -> Path | None:
        return self.workdir / self.cfg.records / job.variant.name / f"seed{job.seed}.json" if self.cfg.records else None

    def record(self, job: Job) -> dict[str, Any] | None:
        """The job's record if it holds the job's current key (one of another key is of other settings: ignored)."""
        path = self.record_path(job)
        if path is None or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not a JSON ablation record ({e}); delete it to rerun {job.name}") from e
        if not isinstance(record, dict) or not {"key", "params", "metrics", "start_time", "end_time"} <= set(record):
            raise ConfigError(f"{path}: expected an ablation record with key, params, metrics, start_time and "
                              f"end_time; delete it to rerun {job.name}")
        return record if record["key"] == self.keys[job.name] else None

    def write_record(self, job: Job, run_id: str) -> Path | None:
        """Write the record of `job` from its FINISHED child run (sorted keys: a rerun gives a readable diff)."""
        path = self.record_path(job)
        if path is None:
            return None
        run = self.client.get_run(run_id)
        record = {"job": job.name, "key": self.keys[job.name], "start_time": run.info.start_time,
                  "end_time": run.info.end_time, "params": dict(run.data.params), "metrics": dict(run.data.metrics),
                  "tags": {k: v for k, v in run.data.tags.items()
                           if not k.startswith("mlflow.") and k not in UNRECORDED_TAGS}}
        return atomic_write(path, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def restore(self, job: Job, record: dict[str, Any]) -> str:
        """A FINISHED child run of the parent rebuilt from `record`, with the job's original start and end times."""
        from mlflow.entities import Metric, Param

        path = self.record_path(job)
        assert path is not None
        tags = {**record.get("tags", {}), "mlflow.parentRunId": self.parent_id, KIND_TAG: "job",
                KEY_TAG: record["key"], RESTORED_TAG: os.path.relpath(path, self.workdir)}
        run_id = self.client.create_run(self.experiment_id, start_time=record["start_time"], run_name=job.name,
                                        tags=tags).info.run_id
        params = [Param(k, str(v)) for k, v in record["params"].items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[i:i + 100])
        metrics = [Metric(k, float(v), record["end_time"], 0) for k, v in record["metrics"].items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        self.client.set_terminated(run_id, "FINISHED", end_time=record["end_time"])
        return run_id

    def _prepare(self, job: Job, resume: bool) -> Path:
        """A job folder that looks like the project to the stages: shared inputs linked, outputs its own.

        The stages write `data/train`, `data/model`, `metrics/`... relative to their working directory, so running
        them inside the folder keeps every job's outputs apart without any stage knowing about it. A folder of
        another key is emptied (never resume checkpoints of other settings); one of the same key is kept, so an
        interrupted job's training continues from its checkpoints.
        """
        folder = self.folder(job)
        key_file = folder / KEY_FILE
        if folder.exists() and not (resume and key_file.is_file() and key_file.read_text().strip()
                                    == self.keys[job.name]):
            shutil.rmtree(folder)
        for rel in self.cfg.inputs:
            source, link = self.workdir / rel, folder / rel
            if not source.exists():
                raise ConfigError(f"ablate.inputs: {source} does not exist; run `dvc repro` first")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(os.path.relpath(source, link.parent))
        shutil.copyfile(self.workdir / self.params_file, folder / "params.yaml")
        atomic_write(key_file, self.keys[job.name] + "\n")
        return folder

    def _command(self, stage: str, job: Job) -> list[str]:
        sets = [*self.shared, *job.overrides, f"tracking.uri={self.tracking.uri}",
                f"tracking.experiment={self.cfg.experiment}", "tracking.registered_model=",
                "tracking.system_metrics=false"]
        return ["groupvit", stage, "--params", "params.yaml", *(a for s in sets for a in ("--set", s))]

    def run_job(self, job: Job, on_line: Callable[[str], None] = print) -> dict[str, Any]:
        """Train and evaluate `job` in its folder as a child run, unless it finished before with the same key.

        Failures are recorded in the child run and the result (status FAILED), not raised.
        """
        key = self.keys[job.name]
        mine = [c for c in self.children() if c.data.tags.get(KEY_TAG) == key]
        child = next((c for c in mine if c.info.status == "FINISHED"), mine[0] if mine else None)
        record = self.record(job)
        if self.done(job, child, record):
            if record is None:  # finished before records were kept, or its record was deleted
                self.write_record(job, child.info.run_id)
            on_line(f"[{job.name}] finished before (child run {child.info.run_id}): not rerun")
            return {"name": job.name, "run_id": child.info.run_id, "status": "FINISHED", "reused": True}
        if record is not None:  # finished in another store (machine, session): its record holds this key
            run_id = self.restore(job, record)
            on_line(f"[{job.name}] finished before ({self.record_path(job)}): restored as child run {run_id}, "
                    "not rerun")
            return {"name": job.name, "run_id": run_id, "status": "FINISHED", "reused": True}
        resume = child is not None
        if child is None:
            child = self.client.create_run(self.experiment_id, run_name=job.name, tags={
                "mlflow.parentRunId": self.parent_id, KIND_TAG: "job", KEY_TAG: key})
            for k, v in {"base": job.variant.base, "variant": job.variant.name, "seed": job.seed,
                         "changed": ",".join(job.variant.changed) or "(base)",
                         **{f"axis.{a}": lab for a, lab in job.variant.axes.items()}}.items():
                self.client.log_param(child.info.run_id, k, v)
        run_id = child.info.run_id
        self.client.update_run(run_id, status="RUNNING")
        folder = self._prepare(job, resume)
        env = {**tool_env(), "MLFLOW_TRACKING_URI": self.tracking.uri, "MLFLOW_RUN_ID": run_id}
        status, error = "FINISHED", ""
        for stage in ("train", "evaluate"):
            on_line(f"[{job.name}] {stage}: " + " ".join(self._command(stage, job)))
            result = run_streaming(self._command(stage, job), folder, lambda line: on_line(f"[{job.name}] {line}"),
                                   env=env)
            if result.returncode != 0:
                status, error = "FAILED", f"{stage} exited with {result.returncode}: {result.tail[-1500:]}"
                break
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.update_run(run_id, status=status, name=job.name)
        if status == "FINISHED":
            self.write_record(job, run_id)
        return {"name": job.name, "run_id": run_id, "status": status, "reused": False, "error": error}

    def supersede_stale(self) -> list[str]:
        """Tag the children whose key is no longer any job's of the study (an override, the budget or the data
        changed, or the variant left the study): kept for the record, left out of the report."""
        current = set(self.keys.values())
        stale = [c for c in self.children() if c.data.tags.get(KEY_TAG) not in current
                 and c.data.tags.get("groupvit.superseded") != "true"]
        for c in stale:
            self.client.set_tag(c.info.run_id, "groupvit.superseded", "true")
        return [c.info.run_name for c in stale]

    def finish(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The report of the whole study (every current child, also those of earlier sessions) on the parent."""
        from mlflow.entities import Metric

        from pipelines.ablation_report import study_report

        self.supersede_stale()
        report = study_report(self.client, self.parent_id, self.out)
        for path in report["files"]:
            self.client.log_artifact(self.parent_id, str(path))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in report["parent_metrics"].items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.parent_id, metrics=metrics[i:i + 1000])
        failed = [r["name"] for r in results if r["status"] != "FINISHED"]
        if failed:
            self.client.set_tag(self.parent_id, "failed_jobs", ",".join(failed)[:5000])
        return {"parent_run_id": self.parent_id, "experiment_id": self.experiment_id, "markdown": report["markdown"],
                "files": [str(p) for p in report["files"]], "failed": failed,
                "results": [{k: r[k] for k in ("name", "run_id", "status", "reused")} for r in results]}
