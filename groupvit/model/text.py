"""The CLIP-style text encoder: causal transformer with QuickGELU, pooled at the EOT token (no text projection).

Names follow the reference (`token_embedding`, `positional_embedding`, `transformer.resblocks.{k}.{attn, ln_1, mlp.
c_fc, mlp.c_proj, ln_2}`, `ln_final`); the attention keeps `nn.MultiheadAttention`'s parameter names
(`in_proj_weight`, `in_proj_bias`, `out_proj`) so official checkpoints load unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from groupvit.model.config import ModelConfig
from groupvit.model.layers import merge_heads, scaled_dot_attention


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with `nn.MultiheadAttention`'s fused in-projection layout (rows q, k, v)."""

    def __init__(self, width: int, heads: int, attn_impl: str = "auto"):
        super().__init__()
        self.heads = heads
        self.attn_impl = attn_impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # [B, N, 3C] -> [3, B, h, N, C/h]
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, c // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        out = scaled_dot_attention(qkv[0], qkv[1], qkv[2], self.attn_impl, causal=True)
        return self.out_proj(merge_heads(out))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x += Attn(ln_1 x); x += MLP(ln_2 x), MLP = c_fc -> QuickGELU -> c_proj."""

    def __init__(self, width: int, heads: int, attn_impl: str = "auto"):
        super().__init__()
        self.attn = CausalSelfAttention(width, heads, attn_impl)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of `ResidualAttentionBlock`s (`resblocks`), with optional per-block gradient checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, attn_impl: str = "auto"):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_impl) for _ in range(layers)])
        self.grad_checkpointing = False
        # reference (CLIP) init
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class TextTransformer(nn.Module):
    """tokens [N, L] (SOT ... EOT, zero padded) -> features [N, width] at the EOT token (the largest id)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.trim_padding = cfg.trim_text_padding
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.attn_impl)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.grad_checkpointing = cfg.grad_checkpointing

    def check_input(self, tokens: torch.Tensor) -> None:
        """Raise ValueError for a wrong dtype, layout or context length (token ids are checked by the embedding)."""
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer [N, L] tensor, found {tokens.dtype} {list(tokens.shape)}")
        if not 2 <= tokens.shape[1] <= self.context_length:
            raise ValueError(f"tokens: context length {tokens.shape[1]} is outside [2, {self.context_length}] "
                             "(model context_length)")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.check_input(tokens)
        eot = tokens.argmax(dim=-1)  # [N]; EOT 49407 is the largest id
        if self.trim_padding and tokens.shape[0] > 0:
            # Causal attention: positions after the last EOT of the batch never reach any pooled token, so
            # dropping them is exact. One host sync (the length), cheap next to the saved work.
            tokens = tokens[:, : int(eot.max()) + 1]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [N, L, C]
        x = self.transformer(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [N, C]
        return self.ln_final(x)  # per-token LayerNorm: applying it after pooling is exact and cheaper
