"""Precision and compilation helpers, applied by callers (trainer, benchmarks) and tested against the plain path."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """A context that runs matmuls in bf16 (`bf16`; weights and the optimizer stay fp32) or does nothing (`fp32`).

    bf16 needs no loss scaling (unlike the reference's fp16 apex O1).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, found {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def compile_model(model: nn.Module, enabled: bool = True, **kwargs) -> nn.Module:
    """Compile a GroupViT in place with `torch.compile` (any other module: the whole module) and return it.

    The image encoder, the text transformer and both heads are compiled separately (`nn.Module.compile`), so the
    state-dict names stay unchanged (no `_orig_mod.` prefix) and the text-padding trim, which reads one length on
    the host, stays outside the compiled graphs instead of breaking them.
    """
    if not enabled:
        return model
    parts = [getattr(model, name, None) for name in ("img_encoder", "img_projector", "text_projector")]
    text = getattr(model, "text_encoder", None)
    parts.append(getattr(text, "transformer", None))
    if any(p is None for p in parts):
        model.compile(**kwargs)
        return model
    for part in parts:
        part.compile(**kwargs)
    return model
