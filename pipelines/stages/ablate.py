"""`groupvit ablate`: the paper's ablation grid (params `ablate:`) as MLflow child runs under one parent run.

Not a DVC stage: it reads the pipeline's outputs (data/synth, data/shards, data/nouns; run `dvc repro nouns` first)
and writes only under `ablate.out_dir` (data/ablation/): one folder per variant, `table.md` and `chart.png`, which are
also logged to the parent run. The Prefect `ablation` flow (pipelines/flows.py) runs the same grid.

    groupvit ablate                        # the grid in params.yaml
    groupvit ablate --list                 # print the variants and their overrides, run nothing
    groupvit ablate --only baseline --only assignment-soft --set ablate.set=[train.steps=50]
"""
from __future__ import annotations

import sys
from pathlib import Path

from groupvit.config import load_section
from groupvit.errors import ConfigError
from pipelines.ablation import AblationRunner, plan
from pipelines.common import run_stage, stage_parser
from pipelines.config import AblationConfig, OrchestrationConfig
from pipelines.tracking import TrackingConfig
from pipelines.workspace import workspace_lock


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("ablate", "run the ablation grid of params `ablate:` as MLflow child runs")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only these variants")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        params = Path(args.params)
        cfg = load_section(AblationConfig, params, "ablate", args.overrides)
        variants = plan(cfg)
        if args.only:
            unknown = sorted(set(args.only) - {v.name for v in variants})
            if unknown:
                raise ConfigError(f"--only {unknown}: no such variant (variants: {[v.name for v in variants]})")
            variants = [v for v in variants if v.name in args.only]
        if args.list:
            for v in variants:
                print(f"{v.name:<28} {' '.join(v.overrides)}")
            return 0
        workdir = params.resolve().parent
        tracking = load_section(TrackingConfig, params, "tracking", args.overrides, required=False)
        orchestration = load_section(OrchestrationConfig, params, "prefect", args.overrides, required=False)
        with workspace_lock(workdir, orchestration.lock_timeout_seconds, on_wait=print, owner="(groupvit ablate)"):
            extra = tuple(o for o in args.overrides if not o.startswith("ablate."))
            with AblationRunner.session(workdir, params.name, cfg, tracking, variants, extra) as runner:
                results = [runner.run_variant(v) for v in variants]
                summary = runner.finish(results)
        print(summary["markdown"])
        print(f"parent run {summary['parent_run_id']} (experiment {cfg.experiment}); table {summary['table']}, "
              f"chart {summary['chart']}")
        return 1 if summary["failed"] else 0

    return run_stage(body)

