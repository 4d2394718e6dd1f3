"""The figures of a pipeline run: the mIoU headline (the end of `make repro`) and docs/results.md (`make docs`).

    .venv/bin/python -m pipelines.report [metrics/evaluate.json] [--dataset synth_test]   # the headline
    .venv/bin/python -m pipelines.report --markdown docs/results.md                       # regenerate the page
    .venv/bin/python -m pipelines.report --markdown docs/results.md --check               # 1 if the page is stale

The page is a pure function of the metrics files beside `evaluate.json` (no date, commit or machine name in it), so
regenerating it from unchanged metrics gives the same bytes and tests can check the committed page against them.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_write

COMMAND = ".venv/bin/python -m pipelines.report --markdown docs/results.md"
# Which training metrics belong to which evaluated model (dvc.yaml: stages train and train_baseline).
TRAIN_FILES: tuple[tuple[str, str], ...] = (("groupvit", "train.json"), ("vit_pixelwise", "baseline/train.json"))
MODEL_NAMES = {"groupvit": "GroupViT", "vit_pixelwise": "pixel-wise ViT baseline (same data, loss and length)"}
NOT_DATA_SETS = ("classification", "comparison")


def headline(metrics: dict, dataset: str) -> list[str]:
    """One line per evaluated model on `dataset` (mIoU in %), then the GroupViT / baseline ratio when present."""
    if dataset not in metrics:
        raise KeyError(f"no data set {dataset!r} in the metrics (found: {', '.join(metrics)})")
    scores = {name: m for name, m in metrics[dataset].items() if isinstance(m, dict) and "miou" in m}
    lines = [f"{dataset} mIoU  {name:<14} {m['miou']:6.2f} %  (bg_thresh {m.get('bg_thresh', '-')})"
             for name, m in scores.items()]
    if "all_background_miou" in metrics[dataset]:
        lines.append(f"{dataset} mIoU  {'all background':<14} {metrics[dataset]['all_background_miou']:6.2f} %  "
                     "(predicting background everywhere, for scale)")
    for name, ratio in (metrics.get("comparison", {}).get(dataset) or {}).items():
        lines.append(f"{dataset} ratio {name}: {ratio:.3f}")
    return lines


# --- reading -----------------------------------------------------------------------------------------------------

def _read_json(metrics_dir: Path, name: str, required: bool = False) -> dict | None:
    """`metrics_dir/name` as a dict; None when it is absent and not `required`.

    Raises:
        FileNotFoundError: a required file is missing.
        ValueError: the file is not a JSON object (the message names it as `metrics/<name>`).
    """
    path = metrics_dir / name
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"metrics/{name} not found; run the pipeline first (dvc repro)")
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"metrics/{name}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"metrics/{name}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_per_class(metrics_dir: Path) -> tuple[list[str], list[list[str]]] | None:
    """Header and rows of `metrics/per_class_iou.csv` (class, one IoU column per model); None when absent.

    Raises:
        ValueError: no `class` first column, a row of another width or a value that is not a number.
    """
    path = metrics_dir / "per_class_iou.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != "class":
        raise ValueError(f"metrics/per_class_iou.csv: expected a header starting with 'class', found {rows[:1]}")
    header, body = rows[0], rows[1:]
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"metrics/per_class_iou.csv: line {i} has {len(row)} columns, the header {len(header)}")
        for value in row[1:]:
            _number(value, f"metrics/per_class_iou.csv: line {i}")
    return header, body


# --- formatting --------------------------------------------------------------------------------------------------

def _number(value: Any, where: str) -> float:
    """`value` as a float (numbers and numeric strings); ValueError naming `where` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, found {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, found {value!r}") from None


def _fmt(record: dict, key: str, spec: str, where: str) -> str:
    """`record[key]` formatted with `spec`, or '-' when the key is absent (an older or optional figure)."""
    if record.get(key) is None:
        return "-"
    value = _number(record[key], f"{where}: {key}")
    return "-" if math.isnan(value) else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; the first column left-aligned, the rest (figures) right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def _models(results: dict) -> dict[str, dict]:
    """The evaluated models of one data set's results, in file order (skips `all_background_miou` and the like)."""
    return {name: m for name, m in results.items() if isinstance(m, dict) and "miou" in m}


def _para(text: str) -> str:
    """A prose paragraph wrapped at 120 characters, as the hand-written docs are (never inside a word)."""
    return textwrap.fill(text, width=120, break_long_words=False, break_on_hyphens=False)


def _missing(name: str, what: str) -> list[str]:
    return [f"_`metrics/{name}` not found: {what}._", ""]


# --- sections ----------------------------------------------------------------------------------------------------

def _held_out(metrics: dict, dataset: str) -> list[str]:
    results = metrics[dataset]
    where = f"metrics/evaluate.json: {dataset}"
    rows = []
    for name, m in _models(results).items():
        w = f"{where}: {name}"
        rows.append([f"`{name}`", f"**{_fmt(m, 'miou', '.2f', w)}**", _fmt(m, "pixel_accuracy", ".2f", w),
                     _fmt(m, "mean_accuracy", ".2f", w), _fmt(m, "bg_thresh", "g", w), _fmt(m, "oracle_miou", ".2f", w),
                     _fmt(m, "groups_per_image", ".1f", w), _fmt(m, "prompt_cosine", ".3f", w),
                     _fmt(m, "num_images", ".0f", w), _fmt(m, "images_per_s", ".1f", w)])
    if "all_background_miou" in results:
        rows.append(["all background (for scale)", _fmt(results, "all_background_miou", ".2f", where)]
                    + ["-"] * 8)
    lines = [f"## Held-out zero-shot segmentation (`{dataset}`)", "",
             _para("mIoU over all classes including background, in %. Each model uses the background threshold it "
                   "was tuned to on the validation split; the held-out split is never used for tuning."), ""]
    lines += _table(["model", "mIoU", "pixel acc.", "mean acc.", "threshold", "group oracle", "groups / image",
                     "prompt cosine", "images", "images/s"], rows)
    lines.append("")
    ratios = (metrics.get("comparison") or {}).get(dataset) or {}
    for name, ratio in ratios.items():
        label = " / ".join(f"`{part}`" for part in name.split("_over_"))  # groupvit_over_vit_pixelwise
        lines.append(f"mIoU ratio {label}: **{_number(ratio, f'metrics/evaluate.json: comparison: {name}'):.3f}**.")
    if not ratios:
        lines.append("No mIoU ratio recorded (the baseline was not evaluated).")
    lines.append("")
    present = [f"`{n}`: {MODEL_NAMES[n]}" for n in _models(results) if n in MODEL_NAMES]
    if present:
        lines += [_para("Models: " + "; ".join(present) + ". The group oracle labels each final group with the "
                        "true majority class of its pixels (for the baseline the groups are its patches); see "
                        "[evaluation.md](evaluation.md#diagnostics)."), ""]
    return lines


def _other_data_set(metrics: dict, dataset: str) -> list[str]:
    results = metrics[dataset]
    models = _models(results)
    where = f"metrics/evaluate.json: {dataset}"
    tuned = any("sweep" in m for m in models.values())
    title = f"## Validation (`{dataset}`, the tuning split)" if tuned else f"## Segmentation (`{dataset}`)"
    rows = []
    for name, m in models.items():
        w = f"{where}: {name}"
        rows.append([f"`{name}`", _fmt(m, "miou", ".2f", w), _fmt(m, "bg_thresh", "g", w),
                     _fmt(m, "best_miou", ".2f", w), _fmt(m, "best_bg_thresh", "g", w),
                     _fmt(m, "oracle_miou", ".2f", w), _fmt(m, "groups_per_image", ".1f", w),
                     _fmt(m, "num_images", ".0f", w)])
    if "all_background_miou" in results:
        rows.append(["all background (for scale)", _fmt(results, "all_background_miou", ".2f", where)] + ["-"] * 6)
    lines = [title, ""]
    if tuned:
        lines += [_para("mIoU at the evaluation's default threshold, and the best of the threshold sweep (the "
                        "threshold the held-out split then uses)."), ""]
    lines += _table(["model", "mIoU", "threshold", "best swept mIoU", "best threshold", "group oracle",
                     "groups / image", "images"], rows)
    lines.append("")
    sweeps = {name: m["sweep"] for name, m in models.items() if isinstance(m.get("sweep"), dict)}
    if sweeps:
        thresholds = sorted({t for s in sweeps.values() for t in s}, key=lambda t: _number(t, f"{where}: sweep"))
        rows = [[t] + [_fmt(s, t, ".2f", f"{where}: {name}: sweep") for name, s in sweeps.items()]
                for t in thresholds]
        lines += ["mIoU by background threshold (1 = only each image's best-scoring group is foreground):", ""]
        lines += _table(["threshold"] + [f"`{n}`" for n in sweeps], rows)
        lines.append("")
    return lines


def _per_class(metrics_dir: Path, report: str) -> list[str]:
    lines = [f"## Per-class IoU (`{report}`)", ""]
    table = _read_per_class(metrics_dir)
    if table is None:
        return lines + _missing("per_class_iou.csv", "the evaluate stage has not run")
    header, body = table
    rows = [[cls] + [f"{float(v):.2f}" for v in values] for cls, *values in body]
    return lines + _table(["class"] + [f"`{h}`" for h in header[1:]], rows) + [""]


def _classification(metrics: dict) -> list[str]:
    sets = metrics.get("classification") or {}
    if not sets:
        return []
    lines = ["## Zero-shot classification", ""]
    for name, models in sets.items():
        where = f"metrics/evaluate.json: classification: {name}"
        rows = [[f"`{model}`", _fmt(m, "top1", ".2f", where), _fmt(m, "top5", ".2f", where),
                 _fmt(m, "num_images", ".0f", where)] for model, m in models.items() if isinstance(m, dict)]
        lines += [f"`{name}`, accuracy in %:", ""] + _table(["model", "top-1", "top-5", "images"], rows) + [""]
    return lines


def _training(metrics_dir: Path) -> list[str]:
    lines = ["## Training", ""]
    rows, absent = [], []
    for model, name in TRAIN_FILES:
        record = _read_json(metrics_dir, name)
        if record is None:
            absent.append(name)
            continue
        where = f"metrics/{name}"
        stopped = record.get("stopped_by_budget")
        rows.append([f"`{model}`", _fmt(record, "steps", ".0f", where), _fmt(record, "planned_steps", ".0f", where),
                     str(record.get("planned_by", "-")), _fmt(record, "max_minutes", "g", where),
                     "-" if stopped is None else ("yes" if stopped else "no"),
                     _fmt(record, "final_loss", ".4f", where), _fmt(record, "wall_s", ".0f", where),
                     _fmt(record, "images_per_s", ".1f", where), _fmt(record, "world_size", ".0f", where),
                     _fmt(record, "global_batch", ".0f", where)])
    if rows:
        lines += _table(["model", "steps", "planned steps", "planned by", "budget (min)", "stopped by budget",
                         "final loss", "wall time (s)", "images/s", "processes", "global batch"], rows)
        lines += ["", _para("The final loss is each model's own objective ([method.md](method.md)), so the two are "
                            "not comparable; loss curves: `metrics/train_loss.csv`, `metrics/baseline/train_loss.csv` "
                            "(`dvc plots show`)."), ""]
    for name in absent:
        lines += _missing(name, "that training stage has not run")
    return lines


def _data(metrics_dir: Path, metrics: dict) -> list[str]:
    lines = ["## Data", ""]
    download = _read_json(metrics_dir, "download.json")
    if download is None:
        lines += _missing("download.json", "the download stage has not run")
    else:
        w = "metrics/download.json"
        rate = download.get("success_rate")
        rows = [["urls", _fmt(download, "count", ".0f", w)],
                ["images downloaded", _fmt(download, "successes", ".0f", w)],
                ["failed to download", _fmt(download, "failed_to_download", ".0f", w)],
                ["failed to resize", _fmt(download, "failed_to_resize", ".0f", w)],
                ["success rate", "-" if rate is None else f"{100 * _number(rate, f'{w}: success_rate'):.2f} %"],
                ["shards", _fmt(download, "shards", ".0f", w)],
                ["download time (s), images/s", f"{_fmt(download, 'seconds', '.1f', w)}, "
                                                f"{_fmt(download, 'images_per_s', '.1f', w)}"]]
        reasons = download.get("failures_by_reason") or {}
        rows += [[f"failures: {reason}", f"{_number(n, f'{w}: failures_by_reason: {reason}'):.0f}"]
                 for reason, n in reasons.items()]
        lines += ["Caption data (`metrics/download.json`):", ""] + _table(["", "value"], rows) + [""]
    nouns = _read_json(metrics_dir, "nouns.json")
    if nouns is None:
        lines += _missing("nouns.json", "the nouns stage has not run")
    else:
        w = "metrics/nouns.json"
        rows = [["captions tagged", _fmt(nouns, "captions", ".0f", w)],
                ["captions without a kept word", _fmt(nouns, "no_words", ".0f", w)],
                ["mean kept words per caption", _fmt(nouns, "mean_words", ".2f", w)],
                ["spaCy model", f"`{nouns['spacy_model']}`" if "spacy_model" in nouns else "-"],
                ["tagging time (s), captions/s", f"{_fmt(nouns, 'seconds', '.1f', w)}, "
                                                 f"{_fmt(nouns, 'captions_per_s', '.1f', w)}"]]
        lines += ["Nouns (`metrics/nouns.json`):", ""] + _table(["", "value"], rows) + [""]
    counts = [[f"`{ds}`", _fmt(next(iter(_models(metrics[ds]).values())), "num_images", ".0f", ds)]
              for ds in metrics if ds not in NOT_DATA_SETS and isinstance(metrics[ds], dict) and _models(metrics[ds])]
    if counts:
        lines += ["Evaluation images:", ""] + _table(["data set", "images"], counts) + [""]
    return lines


def results_markdown(metrics_dir: Path, dataset: str = "synth_test") -> str:
    """docs/results.md from the metrics files in `metrics_dir`: the same bytes for the same files.

    Args:
        metrics_dir: the folder holding evaluate.json (required) and the other stages' metrics (each optional: a
            missing one is said so on the page).
        dataset: the held-out data set of the headline table (evaluate's `report`).

    Raises:
        FileNotFoundError: no evaluate.json.
        KeyError: `dataset` is not in evaluate.json.
        ValueError: a malformed metrics file (the message names it, and the key or line).
    """
    metrics = _read_json(metrics_dir, "evaluate.json", required=True)
    assert metrics is not None
    if dataset not in metrics or not isinstance(metrics[dataset], dict):
        raise KeyError(f"metrics/evaluate.json: no data set {dataset!r} (found: {', '.join(metrics)})")
    lines = ["# Results", "", "<!-- Generated by pipelines/report.py from metrics/: edits are overwritten. -->", "",
             _para("Generated from the pipeline's metrics files in `metrics/` by this command (or `make docs`); do "
                   "not edit by hand:"), "", "```bash", COMMAND, "```", "",
             _para("These are the figures of the run whose `metrics/` are in this checkout (`dvc metrics show` prints "
                   "the same numbers); regenerate after `dvc repro`. What the recipe is, why it departs from the "
                   "paper and what each departure measured: [method.md](method.md). How the figures are computed: "
                   "[evaluation.md](evaluation.md)."), ""]
    lines += _held_out(metrics, dataset)
    for other in metrics:
        if other not in NOT_DATA_SETS and other != dataset and isinstance(metrics[other], dict):
            lines += _other_data_set(metrics, other)
    lines += _per_class(metrics_dir, dataset)
    lines += _classification(metrics)
    lines += _training(metrics_dir)
    lines += _data(metrics_dir, metrics)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="?", default="metrics/evaluate.json",
                   help="evaluate.json; --markdown reads the other metrics files beside it")
    p.add_argument("--dataset", default="synth_test", help="data set whose figures are printed (default synth_test)")
    p.add_argument("--markdown", metavar="PATH", help="write the results page there instead of printing the headline")
    p.add_argument("--check", action="store_true", help="with --markdown: exit 1 if PATH differs, write nothing")
    args = p.parse_args(argv)
    path = Path(args.metrics)
    if args.check and not args.markdown:
        p.error("--check needs --markdown PATH")
    if not path.is_file():
        print(f"error: {path} not found; run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    try:
        if args.markdown:
            text = results_markdown(path.parent, args.dataset)
        else:
            lines = headline(json.loads(path.read_text()), args.dataset)
    except (KeyError, ValueError, FileNotFoundError) as e:  # json.JSONDecodeError is a ValueError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {path}: {msg}" if not args.markdown else f"error: {msg}", file=sys.stderr)
        return 2
    if not args.markdown:
        print("\n".join(["", "== zero-shot semantic segmentation (synthetic held-out split) ==", *lines]))
        return 0
    out = Path(args.markdown)
    if args.check:
        if not out.is_file() or out.read_text() != text:
            print(f"error: {out} is out of date with {path.parent}/: regenerate it with `make docs`", file=sys.stderr)
            return 1
        print(f"{out} is up to date with {path.parent}/")
        return 0
    atomic_write(out, text)  # a failed write keeps the old page
    print(f"wrote {out} from {path.parent}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
