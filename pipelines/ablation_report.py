"""The report of an ablation study, built from its MLflow runs alone: per base and variant the mean, spread and
per-seed values, the change from the base, the paper's direction of each effect, the budget and the study's time.

    .venv/bin/groupvit ablate --report docs/ablations.md     # the latest parent run of `ablate.study`

The figures come from the child runs (`miou_test`, `miou_val`, `group_oracle`, `prompt_cosine`,
`final/final_loss`, `synth_test/all_background_miou` for scale, the runs' start and end times); what the paper
found is `PAPER` below, its direction only (its figures are for GCC+YFCC at 30 epochs and are not comparable with
this world's).
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_write

FLOOR = "synth_test/all_background_miou"  # predicting background everywhere: the mIoU a model must rise above
FIGURES = ("miou_test", "miou_val", "group_oracle", "prompt_cosine", "final/final_loss", FLOOR)


@dataclass(frozen=True)
class PaperEffect:
    """What the paper reports for an axis: its labels from best to worst (labels joined by `|` share a rank: the
    paper did not compare them), where, and a likely reason if this world disagrees (a hypothesis about scale,
    stated as such in the report)."""

    order: tuple[str, ...]
    source: str
    if_not_here: str


# Xu et al., CVPR 2022 (arXiv 2202.11094), section 4.3 and Tables 1-3, zero-shot PASCAL VOC mIoU.
PAPER = {
    "assignment": PaperEffect(
        ("hard", "soft"), "Table 1: hard (Gumbel, straight-through) assignment beats soft",
        "here each segment is averaged from 64 patch tokens of a 64 px image for 625 steps; a soft assignment's "
        "dense gradient reaches every group from the first step, which a short run needs more than the crisp "
        "segments hard assignment gives a long one"),
    "multi_label": PaperEffect(
        ("image|segment", "off"), "Table 1: the multi-label contrastive loss (prompted nouns vs the image) helps",
        "with ten categories and captions that name them, the caption loss alone already carries the nouns; the "
        "prompted copies add little signal"),
    "group_tokens": PaperEffect(
        ("64", "32", "16", "8"), "Table 2: more group tokens segment better (the released model: 64)",
        "a 64 px image has 64 patches: 64 group tokens leave about one patch per segment (no grouping), and 2 to 4 "
        "objects per image need far fewer segments than a photograph"),
    "stages": PaperEffect(
        ("2-stage", "1-stage"), "Table 3: two grouping stages beat one",
        "after one stage of 16 segments over 64 patches a second stage has little left to merge, and at this size "
        "it collapses to one or two used groups"),
}


@dataclass
class VariantStats:
    """One variant's children: per-seed figures and their summary."""

    name: str
    base: str
    changed: tuple[str, ...]
    axes: dict[str, str]
    seeds: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [m[metric] for _, m in sorted(self.seeds.items()) if metric in m]

    def mean(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.fmean(v) if v else None

    def std(self, metric: str) -> float | None:
        v = self.values(metric)
        return statistics.stdev(v) if len(v) > 1 else None


def collect(children: Sequence[Any], order: Sequence[str] = ()) -> list[VariantStats]:
    """Group the current (FINISHED, not superseded) child runs by variant: bases in order, each base's own row
    first, then the variants in `order` (the plan), else in the order they first ran."""
    out: dict[str, VariantStats] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        tags, params = run.data.tags, run.data.params
        if run.info.status != "FINISHED" or tags.get("groupvit.superseded") == "true" or "variant" not in params:
            continue
        name = params["variant"]
        changed = tuple(a for a in params.get("changed", "").split(",") if a and a != "(base)")
        stats = out.setdefault(name, VariantStats(name, params.get("base", ""), changed, {
            k[len("axis."):]: v for k, v in params.items() if k.startswith("axis.")}))
        stats.seeds[int(params["seed"])] = {k: float(v) for k, v in run.data.metrics.items() if k in FIGURES}
        if run.info.end_time:
            stats.seconds.append((run.info.end_time - run.info.start_time) / 1000)
    ordered = sorted(out.values(), key=lambda s: list(order).index(s.name) if s.name in order else len(order))
    bases = list(dict.fromkeys(s.base for s in ordered))
    return sorted(ordered, key=lambda s: (bases.index(s.base), bool(s.changed)))  # stable: plan order within


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _mean_pm(s: VariantStats, metric: str) -> str:
    mean, std = s.mean(metric), s.std(metric)
    return "-" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def paper_sign(axis: str, label: str, base_label: str) -> int:
    """+1 when the paper ranks `label` above the base's label on `axis`, -1 below, 0 when it says nothing."""
    effect = PAPER.get(axis)
    rank = {lab: i for i, tier in enumerate(effect.order) for lab in tier.split("|")} if effect else {}
    if label not in rank or base_label not in rank or rank[label] == rank[base_label]:
        return 0
    return 1 if rank[label] < rank[base_label] else -1


def floor(stats: list[VariantStats]) -> float | None:
    """The all-background mIoU of the test set (the same for every run: it depends on the data only)."""
    values = [v for s in stats for v in s.values(FLOOR)]
    return statistics.fmean(values) if values else None


def at_floor(s: VariantStats, metric: str, level: float | None) -> bool:
    """Whether a variant's mean is no further above the all-background level than its seeds spread (at least one
    point): such a model has not learned to segment, so a change measured against it says little."""
    mean = s.mean(metric)
    return level is not None and mean is not None and mean - level <= max(s.std(metric) or 0.0, 1.0)


def verdicts(stats: list[VariantStats], metric: str) -> list[str]:
    """One plain sentence per variant whose axis the paper ranked: agrees, disagrees (and why that may be), or
    within the seeds' spread; and whether either side stays at the all-background level."""
    lines = []
    level = floor(stats)
    bases = {s.base: s for s in stats if not s.changed}
    for s in stats:
        if len(s.changed) != 1 or s.base not in bases:
            continue
        axis, base = s.changed[0], bases[s.base]
        sign = paper_sign(axis, s.axes.get(axis, ""), base.axes.get(axis, ""))
        ours, theirs = s.mean(metric), base.mean(metric)
        if sign == 0 or ours is None or theirs is None:
            continue
        delta = ours - theirs
        spread = max(x for x in (s.std(metric), base.std(metric), 0.0) if x is not None)
        effect = PAPER[axis]
        label, base_label = s.axes[axis], base.axes[axis]
        said = f"the paper: {effect.source}"
        if s.std(metric) is None or base.std(metric) is None:  # one seed: no spread to judge the change against
            verdict = (f"**{axis}, {base_label} -> {label}** ({s.base}): {delta:+.2f} mIoU from a single seed, not yet "
                       f"a finding (single runs here move by up to 13 points between seeds); {said}.")
        elif abs(delta) <= spread:
            verdict = (f"**{axis}, {base_label} -> {label}** ({s.base}): {delta:+.2f} mIoU, within the seeds' spread "
                       f"(±{spread:.2f}); this world neither confirms nor contradicts {said}.")
        elif (delta > 0) == (sign > 0):
            verdict = (f"**{axis}, {base_label} -> {label}** ({s.base}): {delta:+.2f} mIoU, the paper's direction "
                       f"({said}).")
        else:
            verdict = (f"**{axis}, {base_label} -> {label}** ({s.base}): {delta:+.2f} mIoU, the opposite of {said}. "
                       f"A likely reason at this scale: {effect.if_not_here}.")
        stuck = [f"`{x.name.split('/', 1)[-1]}`" for x in (base, s) if at_floor(x, metric, level)]
        if stuck:
            verdict += (f" Note: {' and '.join(stuck)} {'stay' if len(stuck) > 1 else 'stays'} at the "
                        f"all-background level ({level:.2f}): not a segmenter yet at this budget.")
        lines.append(verdict)
    return lines


def markdown(stats: list[VariantStats], metric: str, budget: str, timing: str) -> str:
    """The report: one table per base, the verdicts, the budget and the study's time."""
    lines = [f"Ranked by `{metric}` (held-out `synth_test` mIoU, %), mean ± sample standard deviation over seeds; "
             f"Δ is the change of the mean from the base's own row. {budget} {timing}", ""]
    for base in dict.fromkeys(s.base for s in stats):
        rows = [s for s in stats if s.base == base]
        ref = next((s for s in rows if not s.changed), None)
        lines += [f"### Base `{base}`", "",
                  f"| variant | {metric} | per seed | Δ | miou_val | group oracle | prompt cosine | final loss | "
                  "paper |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
        for s in rows:
            delta = (s.mean(metric) - ref.mean(metric)) if ref and s is not ref and s.mean(metric) is not None \
                and ref.mean(metric) is not None else None
            per_seed = " / ".join(f"{v:.1f}" for v in s.values(metric))
            axis = s.changed[0] if len(s.changed) == 1 else ""
            sign = paper_sign(axis, s.axes.get(axis, ""), ref.axes.get(axis, "")) if ref and axis else 0
            paper = {1: "better", -1: "worse", 0: "-"}[sign] if s.changed else "base"
            name = s.name.split("/", 1)[-1]
            lines.append(f"| {name} | {_mean_pm(s, metric)} | {per_seed} | {_fmt(delta)} | "
                         f"{_fmt(s.mean('miou_val'))} | {_fmt(s.mean('group_oracle'))} | "
                         f"{_fmt(s.mean('prompt_cosine'), 3)} | {_fmt(s.mean('final/final_loss'), 3)} | {paper} |")
        level = floor(rows)
        if level is not None:
            lines.append(f"| all background (for scale) | {level:.2f} |" + " - |" * 7)
        lines.append("")
    said = verdicts(stats, metric)
    if said:
        lines += ["### Against the paper", "", *[f"- {v}" for v in said], ""]
    lines += ["\"paper\": whether the paper found this variant's value better or worse than the base's (Tables 1-3 of "
              "arXiv 2202.11094; \"-\": an axis the paper did not ablate, such as this project's departures)."]
    return "\n".join(lines) + "\n"


def chart(stats: list[VariantStats], metric: str, path: Path) -> Path:
    """Per base, the mean of `metric` per variant with its seed spread (bar, error bar, one dot per seed); the
    paper's direction beside each variant it ranked (▲ expected better than the base, ▼ worse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(s.base for s in stats))
    heights = [len([s for s in stats if s.base == b]) for b in bases]
    fig, axes = plt.subplots(len(bases), 1, figsize=(8, 0.42 * sum(heights) + 1.3 * len(bases)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, base in zip(axes[:, 0], bases, strict=True):
        rows = [s for s in stats if s.base == base][::-1]
        ref = next((s for s in rows if not s.changed), None)
        names = [s.name.split("/", 1)[-1] for s in rows]
        means = [s.mean(metric) or 0.0 for s in rows]
        errs = [s.std(metric) or 0.0 for s in rows]
        ax.barh(names, means, xerr=errs, color=["#dd8452" if not s.changed else "#4c72b0" for s in rows],
                alpha=0.85, capsize=3)
        for y, s in enumerate(rows):
            ax.scatter(s.values(metric), [y] * len(s.values(metric)), color="black", s=9, zorder=3)
            axis = s.changed[0] if len(s.changed) == 1 else ""
            sign = paper_sign(axis, s.axes.get(axis, ""), ref.axes.get(axis, "")) if ref and axis else 0
            if sign:
                ax.annotate("paper ▲" if sign > 0 else "paper ▼", (1.0, y), xycoords=("axes fraction", "data"),
                            xytext=(4, 0), textcoords="offset points", va="center", fontsize=8,
                            color="#2a7a2a" if sign > 0 else "#a33")
        if ref is not None and ref.mean(metric) is not None:
            ax.axvline(ref.mean(metric), color="#dd8452", lw=1, ls="--")
        ax.set_title(f"base: {base}", fontsize=10, loc="left")
        ax.set_xlim(0, max([m + e for m, e in zip(means, errs, strict=True)] + [1.0]) * 1.12)
    axes[-1, 0].set_xlabel(f"{metric} (mean ± std over seeds; dots: seeds)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _budget(children: Sequence[Any], shared: Sequence[str]) -> str:
    steps = sorted({int(r.data.metrics["final/steps"]) for r in children if "final/steps" in r.data.metrics})
    batch = sorted({r.data.params.get("run.global_batch", "?") for r in children})
    if not steps:
        return ""
    changed = [o for o in shared if o.startswith(("train.", "data."))]  # `ablate.set`: every job's overrides
    length = (f"with the study's overrides of every job: {', '.join(f'`{o}`' for o in changed)}" if changed
              else "the default pipeline's own length")
    return (f"Budget per job: {'/'.join(map(str, steps))} training steps at a global batch of {'/'.join(batch)} "
            f"({length}), then the evaluation of that model.")


def _timing(children: Sequence[Any], stats: list[VariantStats], planned: int | None = None) -> str:
    """The study's time; with `planned` (variants x seeds of its plan), whether it has finished."""
    done = [r for r in children if r.info.end_time and r.info.status == "FINISHED"]
    if not done:
        return ""
    unfinished = (f" **Unfinished: {len(done)} of the {planned} planned jobs have run**; `groupvit ablate` continues "
                  "the study where it stopped." if planned and len(done) < planned else "")
    total = sum((r.info.end_time - r.info.start_time) / 1000 for r in done)
    span = (max(r.info.end_time for r in done) - min(r.info.start_time for r in done)) / 1000
    per = [t for s in stats for t in s.seconds]
    # restored from `ablate.records`: run in another MLflow store (machine, session), so the span has gaps
    restored = sum("groupvit.restored_from" in r.data.tags for r in done)
    elsewhere = (f" {restored} of the jobs ran in other MLflow stores (restored from their records), so that span "
                 "includes the time between those runs." if restored else "")
    jobs, variants = (f"{n} {word}{'s' * (n != 1)}" for n, word in ((len(done), "job"), (len(stats), "variant")))
    return (f"{jobs} ({variants}), {total / 3600:.2f} h of job time in all "
            f"({statistics.median(per) / 60:.1f} min per job, median), {span / 3600:.2f} h from the first job's start "
            "to the last one's end." + elsewhere + unfinished)


def study_report(client: Any, parent_id: str, out_dir: Path, metric: str = "miou_test") -> dict[str, Any]:
    """Build the report of the parent run's study: `out_dir/table.md`, `chart.png`, `report.json`.

    Returns: `{"markdown", "files", "parent_metrics", "stats"}`; parent metrics are `<metric>_mean/<variant>`,
    `<metric>_std/<variant>` and `best_<metric>`.
    """
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=5000)
    try:  # the plan the study ran (its order); a parent without one orders by first run
        with open(client.download_artifacts(parent_id, "plan.json")) as f:
            plan = json.load(f)
        order, planned = list(plan["variants"]), len(plan["variants"]) * len(plan.get("seeds", [])) or None
        shared = plan.get("shared", [])
    except Exception:  # noqa: BLE001 (any failure to read an optional artifact)
        order, planned, shared = [], None, []
    stats = collect(children, order)
    current = [r for r in children if r.data.tags.get("groupvit.superseded") != "true"]
    body = markdown(stats, metric, _budget(current, shared), _timing(current, stats, planned))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [atomic_write(out_dir / "table.md", f"# Ablation study `{parent.info.run_name}`\n\n" + body)]
    if stats:
        files.append(chart(stats, metric, out_dir / "chart.png"))
    summary = {s.name: {"base": s.base, "changed": list(s.changed), "axes": s.axes, "seeds": s.seeds,
                        "mean": s.mean(metric), "std": s.std(metric)} for s in stats}
    files.append(atomic_write(out_dir / "report.json", json.dumps(summary, indent=2, sort_keys=True) + "\n"))
    parent_metrics: dict[str, float] = {}
    for s in stats:
        if s.mean(metric) is not None:
            parent_metrics[f"{metric}_mean/{s.name}"] = s.mean(metric)
        if s.std(metric) is not None:
            parent_metrics[f"{metric}_std/{s.name}"] = s.std(metric)
    means = [s.mean(metric) for s in stats if s.mean(metric) is not None]
    if means:
        parent_metrics[f"best_{metric}"] = max(means)
    return {"markdown": body, "files": files, "parent_metrics": parent_metrics, "stats": stats}
