"""The orchestration sections of params.yaml, `prefect` (`OrchestrationConfig`) and `ablate` (`AblationConfig`), and
`SECTIONS`, the registry of every params.yaml section's config class (what docs/params.md is generated from).

`SECTIONS` is built on first access: the model and training configs live in packages that import torch, which the
orchestrators (`pipelines.flows`, `pipelines.serve`) that read the classes here have no use for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from groupvit.config import param


@dataclass(frozen=True)
class OrchestrationConfig:
    """How Prefect runs the pipeline: the `prefect:` section of params.yaml."""

    deployment: str = param("groupvit-retrain", help="name of the `retrain` deployment (make serve, make deploy)")
    cron: str = param("0 3 * * 1", help="retrain schedule (cron, in `timezone`)")
    timezone: str = param("UTC", help="IANA time zone of the cron schedule")
    workdir: str = param(".", help="DVC repository the served flows run in (relative to the params file)")
    retries: int = param(1, ge=0, help="retries of each stage task")
    retry_delay_seconds: float = param(30.0, ge=0, help="wait between retries")
    lock_timeout_seconds: float = param(3600.0, ge=0, help="how long a run waits for another to free the workspace")
    champion_alias: str = param("champion", help="MLflow registry alias of the best model so far")
    promote_metric: str = param("evaluate.json:synth_test.groupvit.miou",
                                help="`<file in metrics/>:<dotted key>` compared for promotion")
    commit: bool = param(False, help="git-commit dvc.lock and metrics/ after a successful retrain")
    push: bool | Literal["auto"] = param("auto", help="dvc push to the default DVC remote after a successful "
                                         "retrain: auto = when one is set, true = always (none is an error)")
    work_pool: str = param("groupvit", help="`process` work pool make deploy deploys `retrain` to, make worker polls")
    heartbeat_seconds: int = param(60, ge=30, help="how often a worker's flow run reports it is alive (make deploy)")
    crash_after_seconds: float = param(300.0, ge=10,
                                       help="a deployed run silent this long is marked Crashed (machine lost)")


@dataclass(frozen=True)
class AblationConfig:
    """The `ablate:` section of params.yaml (`groupvit ablate`, the Prefect `ablation` flow; pipelines/ablation.py)."""

    experiment: str = param("groupvit-ablation", help="MLflow experiment of the parent and child runs")
    study: str = param("default", help="name of the study: a rerun continues the latest parent run of this name")
    seeds: tuple[int, ...] = param((0,), ge=0, help="every variant runs once per seed (the replicates)")
    mode: str = param("one_at_a_time", choices=("one_at_a_time", "grid"),
                      help="one_at_a_time: each base, then one axis changed at a time (the paper's tables); grid: all")
    bases: Any = param(None, help="base name -> overrides, or {set: overrides, axes: [axes varied from it]}; "
                                  "null = one base, params.yaml as it is")
    axes: Any = param(None, help="axis name -> {value label: override or list of overrides}")
    set: tuple[str, ...] = param((), help="overrides applied to every job first (the shared budget)")
    out_dir: str = param("data/ablation", help="job folders <base>/<variant>/seed<k>, table.md and chart.png")
    records: str = param("metrics/ablation", help="one JSON per finished job, <base>/<variant>/seed<k>.json, kept "
                         "in git: a study continues on another machine or MLflow store from them (empty: none)")
    inputs: tuple[str, ...] = param(("data/synth", "data/shards", "data/nouns"),
                                    help="pipeline outputs every job reads (linked into its folder)")
    rank_by: str = param("miou_test", help="child-run metric the report, chart and compare view rank by")


def _sections() -> dict[str, type]:
    """params.yaml section -> the frozen dataclass that reads it, in the order of `groupvit.config.KNOWN_SECTIONS`."""
    from groupvit.config import BaseConfig
    from groupvit.data.config import DataConfig, DownloadConfig, NounsConfig
    from groupvit.evaluation.config import EvaluateConfig
    from groupvit.model.config import ModelConfig
    from groupvit.synth.config import SynthConfig
    from groupvit.training.config import TrainConfig
    from pipelines.tracking import TrackingConfig

    return {"base": BaseConfig, "synth": SynthConfig, "download": DownloadConfig, "nouns": NounsConfig,
            "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig,
            "tracking": TrackingConfig, "prefect": OrchestrationConfig, "ablate": AblationConfig}


SECTIONS: dict[str, type]  # built by the module `__getattr__` below on first access


def __getattr__(name: str) -> Any:
    if name == "SECTIONS":
        globals()["SECTIONS"] = sections = _sections()  # later accesses find the module attribute itself
        return sections
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
