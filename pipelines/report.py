"""Print the headline of a pipeline run: the zero-shot mIoU on the held-out synthetic split (the end of `make repro`).

    .venv/bin/python -m pipelines.report [metrics/evaluate.json] [--dataset synth_test]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="?", default="metrics/evaluate.json")
    p.add_argument("--dataset", default="synth_test", help="data set whose figures are printed (default synth_test)")
    args = p.parse_args(argv)
    path = Path(args.metrics)
    if not path.is_file():
        print(f"error: {path} not found; run the pipeline first (dvc repro)", file=sys.stderr)
        return 2
    try:
        lines = headline(json.loads(path.read_text()), args.dataset)
    except (KeyError, json.JSONDecodeError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    print("\n".join(["", "== zero-shot semantic segmentation (synthetic held-out split) ==", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
