"""The paper's ablations as a grid of train+evaluate variants, one MLflow child run each under one parent run.

The `ablate:` section of params.yaml names the axes; each axis maps value labels to `--set` overrides, the first
value being the baseline:

    ablate:
      mode: one_at_a_time       # the paper's tables: the baseline, then one axis changed at a time | grid: all combos
      axes:
        assignment: {hard: [model.hard_assignment=true], soft: [model.hard_assignment=false]}

Every variant runs the same `groupvit train` and `groupvit evaluate` commands as the DVC stages, with the same seed,
data and budget (`ablate.set`), inside `data/ablation/<variant>/` (the pipeline's outputs linked in). The child run
gets the axes as params (`axis.<name>`), the training losses (logged by the train stage itself, which resumes the
child run through `MLFLOW_RUN_ID`) and `miou`; the parent gets a markdown table and a PNG chart of the comparison,
also written to `data/ablation/`.
"""
from __future__ import annotations

import contextlib
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
from groupvit.config import load_section
from groupvit.errors import ConfigError
from pipelines.config import AblationConfig
from pipelines.tracking import TrackingConfig, git_commit, resolve_uri, setup
from pipelines.workspace import flatten, run_streaming, tool_env

METRIC_FILES = ("train.json", "evaluate.json")  # flattened into the child run's metrics (numbers only)


@dataclass(frozen=True)
class Variant:
    """One point of the grid: a name, the axis labels it takes and the overrides that realise them."""

    name: str
    axes: dict[str, str]
    overrides: tuple[str, ...]


def _axes(cfg: AblationConfig) -> dict[str, dict[str, tuple[str, ...]]]:
    """Validate `ablate.axes` into {axis: {label: overrides}}."""
    where = "ablate.axes"
    if not isinstance(cfg.axes, dict) or not cfg.axes:
        raise ConfigError(f"{where}: expected a mapping of axis name -> {{value label: overrides}}, found {cfg.axes!r}")
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for axis, values in cfg.axes.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where}.{axis}: expected a mapping of value label -> overrides, found {values!r}")
        out[str(axis)] = {}
        for label, overrides in values.items():
            items = [overrides] if isinstance(overrides, str) else overrides
            if not isinstance(items, list) or not all(isinstance(o, str) and "=" in o for o in items):
                raise ConfigError(f"{where}.{axis}.{label}: expected 'section.key=value' or a list of them, "
                                  f"found {overrides!r}")
            out[str(axis)][str(label)] = tuple(items)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def plan(cfg: AblationConfig) -> list[Variant]:
    """The variants to run, baseline first.

    one_at_a_time: the baseline (first label of every axis), then each other label of each axis with the rest at
    baseline. grid: the cartesian product of all axes. Where overrides set the same key, a changed axis wins over
    the baseline labels (so an axis that changes several keys at once, like a whole recipe, is applied as written).
    """
    axes = _axes(cfg)
    baseline = {axis: next(iter(values)) for axis, values in axes.items()}
    if cfg.mode == "grid":
        points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*(list(v) for v in axes.values()))]
    else:
        points = [baseline] + [{**baseline, axis: label} for axis, values in axes.items() for label in list(values)[1:]]
    variants = []
    for point in points:
        changed = [f"{axis}-{label}" for axis, label in point.items() if label != baseline[axis]]
        name = _slug("_".join(changed)) if changed else "baseline"
        kept = [o for axis, label in point.items() if label == baseline[axis] for o in axes[axis][label]]
        overrides = tuple(kept + [o for axis, label in point.items() if label != baseline[axis]
                                  for o in axes[axis][label]])
        variants.append(Variant(name, dict(point), overrides))
    return variants


def metric_value(metrics: dict[str, Any], spec: str) -> float | None:
    value = metrics.get(spec)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def markdown_table(results: list[dict[str, Any]], metric: str = "evaluate.json:miou") -> str:
    """One row per variant: its axis labels, the ranking metric, the final losses and its status."""
    if not results:
        return "_no variants_\n"
    axes = list(results[0]["axes"])
    losses = sorted({k for r in results for k in r["metrics"] if k.startswith("train.json:") and "loss" in k})
    head = ["variant", *axes, metric, *losses, "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["name"], *(r["axes"][a] for a in axes)]
        cells += [_fmt(r["metrics"].get(k)) for k in (metric, *losses)] + [r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def chart(results: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """A horizontal bar chart of `metric` per variant (baseline on top), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in results][::-1]
    values = [metric_value(r["metrics"], metric) or 0.0 for r in results][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.2))
    bars = ax.barh(names, values, color=["#4c72b0" if n != "baseline" else "#dd8452" for n in names])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
    ax.set_xlabel(metric.partition(":")[2] or metric)
    ax.set_title("GroupViT ablation (same seed, data and budget)")
    ax.set_xlim(0, max(values + [1e-6]) * 1.2)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # tmp has no .png suffix
    finally:
        plt.close(fig)


def _read_metrics(folder: Path) -> dict[str, Any]:
    """`{"<file>:<dotted key>": value}` of the variant's metrics files."""
    out: dict[str, Any] = {}
    for name in METRIC_FILES:
        path = folder / name
        if path.is_file():
            out.update({f"{name}:{k}": v for k, v in flatten(json.loads(path.read_text())).items()})
    return out


class AblationRunner:
    """Runs variants as child runs of one MLflow parent run; see the module docstring."""

    def __init__(self, workdir: Path, params_file: str, cfg: AblationConfig, tracking: TrackingConfig,
                 variants: list[Variant] | None = None, extra_sets: tuple[str, ...] = ()):
        import mlflow

        self.workdir, self.params_file, self.cfg = workdir, params_file, cfg
        self.variants = plan(cfg) if variants is None else variants
        self.extra_sets = extra_sets  # command-line overrides of other sections, applied to every variant
        self.tracking = TrackingConfig(uri=resolve_uri(tracking, root=workdir), experiment=cfg.experiment,
                                       registered_model="", system_metrics=False)
        setup(self.tracking, root=workdir)
        self.client = mlflow.MlflowClient(self.tracking.uri)
        self.experiment_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
        self.out = workdir / cfg.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.parent = self.client.create_run(self.experiment_id, run_name=f"ablation-{time.strftime('%Y%m%d-%H%M%S')}",
                                             tags={"groupvit.ablation": "parent", "git_commit": git_commit(workdir)})
        self.parent_id = self.parent.info.run_id
        self.client.log_param(self.parent_id, "mode", cfg.mode)
        self.client.log_param(self.parent_id, "variants", len(self.variants))
        self.client.log_param(self.parent_id, "shared_overrides", json.dumps([*cfg.set, *extra_sets])[:6000])
        self.client.log_dict(self.parent_id, {v.name: {"axes": v.axes, "overrides": list(v.overrides)}
                                              for v in self.variants}, "grid.json")

    @classmethod
    @contextlib.contextmanager
    def session(cls, *args: Any, **kwargs: Any) -> Iterator[AblationRunner]:
        """`with AblationRunner.session(...) as runner:` (constructor arguments); the parent run ends FAILED if the
        body raises, FINISHED otherwise."""
        runner = cls(*args, **kwargs)
        try:
            yield runner
        except BaseException:
            runner.client.set_terminated(runner.parent_id, "FAILED")
            raise
        else:
            runner.client.set_terminated(runner.parent_id, "FINISHED")

    @classmethod
    def open(cls, workdir: Path,
             params_file: str = "params.yaml") -> contextlib.AbstractContextManager[AblationRunner]:
        """A session with the `ablate` and `tracking` sections of `workdir/params_file`."""
        params = workdir / params_file
        return cls.session(workdir, params_file, load_section(AblationConfig, params, "ablate"),
                           load_section(TrackingConfig, params, "tracking", required=False))

    def _command(self, stage: str, variant: Variant) -> list[str]:
        sets = [*self.cfg.set, *self.extra_sets, *variant.overrides, f"tracking.uri={self.tracking.uri}",
                f"tracking.experiment={self.cfg.experiment}", "tracking.registered_model=",
                "tracking.system_metrics=false"]
        return ["groupvit", stage, "--params", "params.yaml", *(a for s in sets for a in ("--set", s))]

    def _prepare(self, variant: Variant) -> Path:
        """A variant folder that looks like the project to the stages: shared inputs linked, outputs its own.

        The stages write `data/train`, `data/model`, `metrics/`... relative to their working directory, so running
        them inside `<out_dir>/<variant>/` keeps every variant's outputs apart without any stage knowing about it.
        The folder is emptied first: each ablation trains every variant from scratch.
        """
        folder = self.out / variant.name
        if folder.exists():  # a fresh run: never resume an earlier ablation's checkpoints with other settings
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
        return folder

    def run_variant(self, variant: Variant, on_line: Callable[[str], None] = print) -> dict[str, Any]:
        """Train and evaluate `variant` into `<out_dir>/<name>/` as a child run; failures are recorded, not raised."""
        folder = self._prepare(variant)
        child = self.client.create_run(self.experiment_id, run_name=variant.name,
                                       tags={"mlflow.parentRunId": self.parent_id, "groupvit.ablation": "variant"})
        run_id = child.info.run_id
        for axis, label in variant.axes.items():
            self.client.log_param(run_id, f"axis.{axis}", label)
        env = {**tool_env(), "MLFLOW_TRACKING_URI": self.tracking.uri}
        status, error = "FINISHED", ""
        for stage in ("train", "evaluate"):
            env["MLFLOW_RUN_ID"] = run_id  # the stage's own mlflow.start_run resumes the child run
            on_line(f"[{variant.name}] {stage}: " + " ".join(self._command(stage, variant)))
            result = run_streaming(self._command(stage, variant), folder,
                                   lambda line: on_line(f"[{variant.name}] {line}"), env=env)
            if result.returncode != 0:
                status, error = "FAILED", f"{stage} exited with {result.returncode}: {result.tail[-1500:]}"
                break
        metrics = _read_metrics(folder / "metrics") if status == "FINISHED" else {}
        # The stages log their own figures into the child run (losses per step, every mIoU); add the ranking
        # metric under one short name so the compare view and the parent's chart line the variants up.
        ranking = metric_value(metrics, self.cfg.metric)
        if ranking is not None:
            self.client.log_metric(run_id, "miou", ranking)
        if error:
            self.client.set_tag(run_id, "error", error[:5000])
        self.client.update_run(run_id, status=status, name=variant.name)
        return {"name": variant.name, "axes": variant.axes, "run_id": run_id, "status": status,
                "metrics": metrics, "error": error}

    def finish(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Write and log the comparison table (markdown) and chart (PNG) to the parent run."""
        metric = self.cfg.metric
        markdown = f"# Ablation {self.parent.info.run_name}\n\n" + markdown_table(results, metric)
        table = self.out / "table.md"
        atomic_write(table, markdown)
        png = chart(results, metric, self.out / "chart.png")
        self.client.log_artifact(self.parent_id, str(table))
        self.client.log_artifact(self.parent_id, str(png))
        best = max(results, key=lambda r: metric_value(r["metrics"], metric) or -1.0)
        if metric_value(best["metrics"], metric) is not None:
            self.client.log_metric(self.parent_id, "best_miou", metric_value(best["metrics"], metric))
            self.client.set_tag(self.parent_id, "best_variant", best["name"])
        failed = [r["name"] for r in results if r["status"] != "FINISHED"]
        if failed:
            self.client.set_tag(self.parent_id, "failed_variants", ",".join(failed))
        return {"parent_run_id": self.parent_id, "experiment_id": self.experiment_id, "markdown": markdown,
                "table": str(table), "chart": str(png), "failed": failed,
                "results": [{k: r[k] for k in ("name", "run_id", "status")} for r in results]}
