"""The Grouping Block (paper section 3.1): merge image tokens into segments, one per (output) group token.

Shapes: B batch, L image tokens entering the block, S1 group tokens of the stage, S2 output groups, C width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from groupvit.model.layers import CrossAttention, Mlp


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples, -log(-log U) with U kept inside (0, 1) so no sample is infinite."""
    finfo = torch.finfo(like.dtype)
    u = torch.rand_like(like).clamp_(finfo.tiny, 1.0 - finfo.eps)
    return -torch.log(-torch.log(u))


def hard_one_hot(y_soft: torch.Tensor, dim: int) -> torch.Tensor:
    """One-hot of the argmax along `dim`, with straight-through gradients of `y_soft` when it needs them."""
    index = y_soft.argmax(dim, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(dim, index, 1.0)
    if not y_soft.requires_grad:
        return y_hard
    return y_hard - y_soft.detach() + y_soft


class CrossAttnBlock(nn.Module):
    """Pre-assign cross-attention of the grouping block, with post-norm and no norm on queries/keys.

    q += Attn(q, x); q += MLP(LN q); q = LN_post(q). (Not in the paper; NVlabs/GroupViT#54.)
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: str = "auto"):
        super().__init__()
        self.attn = CrossAttention(dim, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = query + self.attn(query, key, kv)
        x = x + self.mlp(self.norm2(x))
        return self.norm_post(x)


class AssignAttention(nn.Module):
    """Single-head attention whose softmax runs over the **group** axis: each image token picks one group.

    Training with hard assignment: Gumbel-softmax (temperature `gumbel_tau`) then a one-hot straight-through
    estimator; eval: one-hot argmax without noise; `hard=False`: plain softmax in both. The assignment is then
    normalised per group by (token count + `assign_eps`), so a segment is the mean of its tokens' values.
    The scores and the softmax run in float32 (Gumbel noise and near-ties are fragile in bf16).
    """

    def __init__(self, dim: int, hard: bool = True, gumbel_tau: float = 1.0, assign_eps: float = 1.0):
        super().__init__()
        self.scale = dim ** -0.5
        self.hard = hard
        self.gumbel_tau = gumbel_tau
        self.assign_eps = assign_eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def assignment(self, raw: torch.Tensor) -> torch.Tensor:
        """[B, S2, L] scores -> [B, S2, L] assignment (one-hot or soft over dim -2)."""
        if not self.hard:
            return raw.softmax(dim=-2)
        if self.training:
            raw = (raw + gumbel_noise(raw)) / self.gumbel_tau
        # eval needs the soft values only for straight-through gradients (hard_one_hot skips them otherwise)
        y_soft = raw.softmax(dim=-2) if (self.training or raw.requires_grad) else raw
        return hard_one_hot(y_soft, dim=-2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_soft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query [B, S2, C], key [B, L, C] -> (segments [B, S2, C], soft map [B, S2, L] or None)."""
        k, v = kv if kv is not None else (self.k_proj(key), self.v_proj(key))
        q = self.q_proj(query)
        dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 under bf16 autocast, fp64 stays fp64
        raw = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * self.scale  # [B, S2, L]
        attn = self.assignment(raw)
        soft = raw.softmax(dim=-2) if return_soft else None
        attn = attn / (attn.sum(dim=-1, keepdim=True) + self.assign_eps)  # mean over assigned tokens
        out = attn.to(v.dtype) @ v  # [B, S2, C]
        return self.proj(out), soft


class GroupingBlock(nn.Module):
    """Group L image tokens into S2 segments using S1 group tokens (reference `GroupingBlock`).

    1. LN both inputs; project the S1 group tokens to S2 with a token-mixing MLP (`mlp_inter`) + LN.
    2. Pre-assign cross-attention of the projected groups over the image tokens (`pre_assign_attn`).
    3. `AssignAttention` merges the image tokens into the groups; residual on the groups; channel MLP.

    Args:
        dim: width C.
        num_heads: heads of the pre-assign attention.
        num_group_token: S1.
        num_output_group: S2.
        hard: hard (Gumbel in training, argmax in eval) or soft assignment.
        gumbel_tau: Gumbel-softmax temperature.
        assign_eps: added to the per-group token count.
        fused_proj: compute the four key/value projections of the image tokens with one GEMM.
        attn_impl: `sdpa` or `eager` for the pre-assign attention.
        group_residual: scale of the residual from the group tokens to the segments (reference 1.0). The tokens
            have attended to every image token (stage blocks, pre-assign attention), so the residual hands each
            segment an image-wide summary; below 1 a segment is more its own tokens' mean (docs/method.md).
    """

    def __init__(self, dim: int, num_heads: int, num_group_token: int, num_output_group: int, hard: bool = True,
                 gumbel_tau: float = 1.0, assign_eps: float = 1.0, fused_proj: bool = True,
                 attn_impl: str = "auto", group_residual: float = 1.0):
        super().__init__()
        self.fused_proj = fused_proj
        self.group_residual = group_residual
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = Mlp(num_group_token, int(0.5 * dim), num_output_group)  # over the token axis
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, num_heads, 4.0, attn_impl)
        self.assign = AssignAttention(dim, hard, gumbel_tau, assign_eps)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, 4 * dim, dim)

    def _key_values(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        """Keys and values of the image tokens for both attentions, as one [B, L, 4C] GEMM when fused."""
        if not self.fused_proj:
            return None, None
        a, b = self.pre_assign_attn.attn, self.assign
        weight = torch.cat([a.k_proj.weight, a.v_proj.weight, b.k_proj.weight, b.v_proj.weight])  # [4C, C]
        bias = torch.cat([a.k_proj.bias, a.v_proj.bias, b.k_proj.bias, b.v_proj.bias])
        k1, v1, k2, v2 = F.linear(x, weight, bias).chunk(4, dim=-1)
        return (k1, v1), (k2, v2)

    def forward(self, x: torch.Tensor, group_tokens: torch.Tensor,
                return_soft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, L, C], group_tokens [B, S1, C] -> (segments [B, S2, C], soft map [B, S2, L] or None)."""
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        # [B, S1, C] -> [B, C, S1] -> [B, C, S2] -> [B, S2, C]
        groups = self.norm_post_tokens(self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2))
        kv_pre, kv_assign = self._key_values(x)
        groups = self.pre_assign_attn(groups, x, kv_pre)
        new_x, soft = self.assign(groups, x, kv_assign, return_soft)
        new_x = new_x + (groups if self.group_residual == 1.0 else self.group_residual * groups)
        return new_x + self.mlp_channels(self.norm_new_x(new_x)), soft
