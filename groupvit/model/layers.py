"""Transformer building blocks of the image encoder: Mlp, DropPath, self- and cross-attention, the pre-norm block.

Parameter names follow the reference (`qkv`, `proj`, `q_proj`/`k_proj`/`v_proj`, `fc1`/`fc2`, `norm1`/`norm2`) so
released checkpoints load unchanged (docs/checkpoint_names.md).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("auto", "sdpa", "eager")


def scaled_dot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "auto",
                         causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last axis of the scores; q [B,h,N,d], k/v [B,h,S,d] -> [B,h,N,d].

    `sdpa` dispatches to PyTorch's fused kernels (flash/memory-efficient: the [N,S] probabilities are never
    stored); `eager` is the readable reference path, kept as a fallback and as the oracle in tests. `auto` uses
    SDPA except for CPU training: torch 2.13's CPU flash-attention backward is ~2x slower than the eager backward
    at these short sequences (docs/benchmarks.md "Model throughput"), while its forward is faster.
    """
    if impl == "auto":
        impl = "eager" if (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad) else "sdpa"
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, h, N, S]
    if causal:
        n, s = scores.shape[-2:]
        mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, C] -> [B, h, L, C/h]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2, on the last axis.

    `recompute_act` (ModelConfig.mlp_recompute_act): autograd keeps both the GELU's input h (for the GELU's own
    backward) and its output a (for fc2's weight gradient), two tensors of [..., hidden]. With the switch, fc2 keeps
    a reference to h instead of a, and a = GELU(h) is recomputed bit for bit when fc2's backward needs it: one
    elementwise op more per backward, a of every MLP not kept.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.recompute_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if not (self.recompute_act and h.requires_grad) or torch.compiler.is_compiling():
            return self.fc2(self.act(h))
        a = self.act(h)
        # plain values: a closure that names `a` would keep it alive (autograd holds the hooks with the graph)
        a_storage, a_dtype = a.untyped_storage().data_ptr(), a.dtype

        def pack(t: torch.Tensor) -> Any:
            if t.untyped_storage().data_ptr() != a_storage:
                return t  # fc2's weight (or its bf16 cast)
            return h, a_dtype, t.size(), t.stride(), t.storage_offset()  # a, or the 2-D view the matmul saved

        def unpack(saved: Any) -> torch.Tensor:
            if isinstance(saved, torch.Tensor):
                return saved
            src, dtype, size, stride, offset = saved  # dtype: as autocast ran the GELU (its input's, on CPU)
            return self.act(src.to(dtype)).as_strided(size, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.fc2(a)


class MixerMlp(Mlp):
    """An Mlp over the token axis (MLP-Mixer token mixing): [B, S_in, C] -> [B, S_out, C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows: q, k, v), as the reference `AttnBlock` uses."""

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3C] -> [3, B, h, N, C/h]
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = scaled_dot_attention(qkv[0], qkv[1], qkv[2], self.attn_impl)  # [B, h, N, C/h]
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys/values (separate q/k/v projections, as the reference).

    `kv` lets the caller pass precomputed key/value projections (the grouping block computes the keys and values of
    its two attentions with one fused GEMM).
    """

    def __init__(self, dim: int, num_heads: int, attn_impl: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else (self.k_proj(key), self.v_proj(key))  # [B, S, C] each
        q = split_heads(self.q_proj(query), self.num_heads)  # [B, h, N, C/h]
        out = scaled_dot_attention(q, split_heads(k, self.num_heads), split_heads(v, self.num_heads), self.attn_impl)
        return self.proj(merge_heads(out))


class AttnBlock(nn.Module):
    """Pre-norm transformer block: x += DropPath(Attn(LN x)); x += DropPath(MLP(LN x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 attn_impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """Reference init of the image encoder: Linear trunc-normal(.02) and zero bias, LayerNorm 1/0 (Conv default)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def set_attn_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention under `module` between `auto`, `sdpa` and `eager` (same weights, same function)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, found {impl!r}")
    for m in module.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl
