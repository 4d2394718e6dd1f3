"""AdamW with the reference decay exemptions and linearly scaled learning rates."""
from __future__ import annotations

import torch
from torch import nn

from groupvit.training.config import OPTIMIZER_IMPLS


def is_decay_exempt(name: str, param: torch.Tensor) -> bool:
    """The reference exempts 1-D parameters (norm weights) and biases only.

    Positional embeddings, group tokens, the token embedding and the 0-dim logit scales *are* decayed
    (as in the official code, github.com/NVlabs/GroupViT): for parity, unlike nanoGPT-style "decay only >= 2-D".
    """
    return param.ndim == 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed and exempt (trainable parameters only), in a stable parameter order."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if is_decay_exempt(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": exempt, "weight_decay": 0.0, "name": "no_decay"}]




def build_optimizer(model: nn.Module, lr: float, weight_decay: float, impl: str = "auto") -> torch.optim.AdamW:
    """AdamW(0.9, 0.999, eps 1e-8) as in the reference.

    Args:
        model: the (unwrapped) model.
        lr: the already scaled learning rate (the schedule overwrites it every step).
        weight_decay: decay of the non-exempt group.
        impl: `for_loop` (one parameter at a time, PyTorch's CPU default), `foreach` (the same arithmetic in a few
            multi-tensor kernels: bit-identical to for_loop on CPU, about 1.5x faster there), `fused` (one kernel:
            fastest, rounds differently, ~1e-7), or `auto` = fused when every parameter is on CUDA, else foreach.
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {OPTIMIZER_IMPLS}, found {impl!r}")
    if impl == "auto":
        impl = "fused" if all(p.is_cuda for p in model.parameters()) else "foreach"
    kind = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8, **kind)
