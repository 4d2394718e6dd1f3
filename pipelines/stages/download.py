"""`groupvit download`: url list -> deterministic webdataset shards with img2dataset (resumable).

DVC stage (for dvc.yaml; after `synth`):
    cmd:     groupvit download
    deps:    data/synth/train/urls.parquet, data/synth/train/images (the `download.url_list` / `download.serve_dir`
             defaults), groupvit/data/config.py, groupvit/data/download.py, groupvit/data/urllist.py,
             groupvit/data/server.py, groupvit/data/distributed.py, groupvit/atomic.py,
             pipelines/stages/download.py
    params:  download (whole section)
    outs:    data/shards   (NNNNN.tar, NNNNN.parquet, NNNNN_stats.json, resolved_config.yaml)
    metrics: metrics/download.json (cache: false)
Not an output: `download.work_dir` (data/download_work), img2dataset's raw output kept so a killed run resumes
without refetching finished shards; add it to .gitignore (everything under data/ is).

Metrics are printed, written to metrics/download.json and, when a tracking URI is set (`tracking.uri` or
MLFLOW_TRACKING_URI), logged to MLflow as a `download` run; that store is checked before any work.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from groupvit.atomic import atomic_write
from groupvit.config import flat_dict, load_section, save_resolved
from groupvit.data.config import DownloadConfig
from groupvit.data.download import download, resolved_config
from pipelines.common import load, run_stage, stage_parser
from pipelines.tracking import TrackingConfig, check_reachable, resolve_uri, start_run

METRICS = Path("metrics/download.json")


def tracking_config(params_file: str, overrides: list[str]) -> TrackingConfig | None:
    """The `tracking` section when a tracking URI is set (a download is not an experiment by default), else None."""
    tracking = load_section(TrackingConfig, params_file, "tracking", overrides, required=False)
    return tracking if tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") else None


def log_to_mlflow(tracking: TrackingConfig, cfg: DownloadConfig, metrics: dict) -> None:
    """Log a `download` run with the download's params and metrics."""
    import mlflow

    with start_run(tracking, "download", tags={"stage": "download"}, log_system_metrics=False):
        mlflow.log_params(flat_dict(resolved_config(cfg), "download."))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_dict(metrics, "download_metrics.json")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("download", "url list -> webdataset shards with img2dataset (resumable, deterministic)")
    args = parser.parse_args(argv)

    def body() -> int:
        cfg = load(DownloadConfig, args, "download")
        tracking = tracking_config(args.params, args.overrides)
        if tracking is not None:  # before any work: an unreachable tracking server fails now, not after the download
            check_reachable(resolve_uri(tracking))
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (DVC/Prefect cancellation) and SIGHUP (a closed terminal) unwind like Ctrl-C: img2dataset and
            # the image server are stopped.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
        metrics = download(cfg)
        save_resolved(Path(cfg.output_dir) / "resolved_config.yaml", download=resolved_config(cfg))
        atomic_write(METRICS, json.dumps(metrics, indent=2) + "\n")
        reasons = ", ".join(f"{n} x {r}" for r, n in metrics["failures_by_reason"].items()) or "none"
        print(f"download: {metrics['successes']}/{metrics['count']} images ({metrics['success_rate']:.1%}) in "
              f"{metrics['shards']} shards ({metrics['shards_fetched']} fetched, {metrics['shards_reused']} reused), "
              f"{metrics['images_per_s']} images/s; failures: {reasons}")
        if tracking is not None:
            log_to_mlflow(tracking, cfg, metrics)
            print("download: metrics logged to MLflow")
        return 0

    return run_stage(body)
