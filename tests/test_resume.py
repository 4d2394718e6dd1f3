"""`groupvit.training.resume`: the configuration a checkpoint must match, and when `fit` resumes instead of starting
afresh (the train stage asks `will_resume` before it opens its MLflow run)."""
from __future__ import annotations

import torch

from groupvit.config import BaseConfig
from groupvit.model import ModelConfig
from groupvit.training import TrainConfig, resume_key, will_resume
from groupvit.training import checkpointing as ckpt
from groupvit.training.resume import stale_reason
from pipelines.tracking import TrackingConfig


def configs(**train) -> dict:
    return {"base": BaseConfig(), "model": ModelConfig(preset="tiny"), "train": TrainConfig(**train),
            "tracking": TrackingConfig()}


def test_the_resume_key_ignores_bookkeeping_speed_and_tracking_only():
    key = resume_key(configs())
    assert key["train.lr"] == TrainConfig().lr and key["model.depths"] == str(list(ModelConfig(preset="tiny").depths))
    assert "base.seed" in key and "train.steps" in key and "train.precision" in key
    assert not any(k.startswith("tracking.") for k in key)
    for k in ("train.log_every", "train.ckpt_every", "train.threads", "train.nproc", "train.max_minutes"):
        assert k not in key
    assert resume_key(configs(log_every=7, threads=3, nproc=2, compile=True, optimizer_impl="fused")) == key
    assert resume_key(configs(lr=0.5)) != key
    switches = ModelConfig(preset="tiny", mlp_recompute_act=True, grad_checkpointing=True, attn_impl="eager")
    assert resume_key({**configs(), "model": switches}) == key  # performance switches: the same function
    assert resume_key({**configs(), "tracking": TrackingConfig(experiment="other", uri="sqlite:///x.db")}) == key


def test_will_resume_only_an_unfinished_run_of_the_same_configuration(tmp_path):
    key = resume_key(configs())
    cfg = TrainConfig()
    assert not will_resume(tmp_path, key, cfg)  # nothing there
    state = {"w": torch.zeros(1), "step": 2, "planned_steps": 6, "plan_fixed": True, "config": key}
    ckpt.save_checkpoint(tmp_path / "checkpoints", 2, state)
    assert will_resume(tmp_path, key, cfg)
    assert not will_resume(tmp_path, resume_key(configs(lr=0.5)), cfg)
    assert "train.lr" in stale_reason(ckpt.load_latest(tmp_path / "checkpoints"), resume_key(configs(lr=0.5)))
    assert not will_resume(tmp_path, key, TrainConfig(resume=False))
    ckpt.save_checkpoint(tmp_path / "checkpoints", 6, {**state, "step": 6})
    assert not will_resume(tmp_path, key, cfg)  # that run finished
    assert stale_reason(ckpt.load_latest(tmp_path / "checkpoints"), key) == "that run finished (a rerun trains again)"
