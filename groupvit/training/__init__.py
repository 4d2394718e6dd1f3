"""Training: optimizer and schedule of the reference recipe, resumable checkpoints, DDP helpers and the loop.

Pure library code: tracking is injected into `fit` as a callback; launching (torchrun) and MLflow live in
`pipelines/stages/train.py`.
"""
from groupvit.training.checkpointing import load_latest, save_checkpoint, save_model
from groupvit.training.config import TrainConfig
from groupvit.training.distributed import DistInfo, destroy_distributed, dist_env, init_distributed, seed_everything
from groupvit.training.loop import NonFiniteLossError, TrainResult, fit, will_resume
from groupvit.training.optim import build_optimizer, param_groups
from groupvit.training.schedule import WarmupCosine

__all__ = ["TrainConfig", "DistInfo", "dist_env", "init_distributed", "destroy_distributed", "seed_everything",
           "build_optimizer", "param_groups", "WarmupCosine", "save_checkpoint", "load_latest", "save_model",
           "fit", "will_resume", "TrainResult", "NonFiniteLossError"]
