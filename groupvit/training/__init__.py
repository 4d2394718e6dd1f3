"""Training: optimizer and schedule of the reference recipe, resumable checkpoints, DDP helpers and the loop.

Pure library code: tracking is injected into `fit` as a callback; launching (torchrun) lives in `pipelines/launch.py`,
MLflow in `pipelines/tracking.py`; the final model folder is written by `groupvit.checkpoint.save_pretrained`.
"""
from groupvit.training.checkpointing import load_latest, save_checkpoint
from groupvit.training.config import TrainConfig
from groupvit.training.distributed import DistInfo, destroy_distributed, dist_env, init_distributed, seed_everything
from groupvit.training.loop import NonFiniteLossError, fit
from groupvit.training.optim import build_optimizer, param_groups
from groupvit.training.result import TrainResult
from groupvit.training.resume import RESUMABLE_CHANGES, resume_key, will_resume
from groupvit.training.schedule import WarmupCosine

__all__ = ["TrainConfig", "DistInfo", "dist_env", "init_distributed", "destroy_distributed", "seed_everything",
           "build_optimizer", "param_groups", "WarmupCosine", "save_checkpoint", "load_latest", "fit", "will_resume",
           "resume_key", "RESUMABLE_CHANGES", "TrainResult", "NonFiniteLossError"]
