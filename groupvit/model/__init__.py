"""GroupViT model: configuration and presets, encoders, projection heads, analytic FLOPs."""
from groupvit.model.config import PRESETS, ModelConfig, count_params, flops_per_sample
from groupvit.model.groupvit import IMAGENET_MEAN, IMAGENET_STD, GroupViT, ProjectMLP
from groupvit.model.perf import autocast, compile_model

__all__ = ["PRESETS", "ModelConfig", "GroupViT", "ProjectMLP", "IMAGENET_MEAN", "IMAGENET_STD", "count_params",
           "flops_per_sample", "autocast", "compile_model"]
