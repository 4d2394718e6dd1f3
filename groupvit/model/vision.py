"""The GroupViT image encoder: patch embedding, stages of transformer blocks with group tokens, grouping blocks.

Token flow of the released model at 224 px: 196 patches + 64 group tokens -> 6 blocks -> GroupingBlock -> 64
segments; + 8 group tokens -> 3 blocks -> GroupingBlock -> 8 segments; 3 blocks -> LN -> mean -> [B, 384].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from groupvit.model.config import ModelConfig
from groupvit.model.grouping import GroupingBlock
from groupvit.model.layers import AttnBlock, MixerMlp, init_weights


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens [B, h*w, C], then LayerNorm (reference `patch_norm=True`)."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # [B, C, h, w]
        grid = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # [B, h*w, C]


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a [1, h*w, C] learned position embedding to another patch grid (align_corners=False)."""
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    c = pos_embed.shape[-1]
    img = pos_embed.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2).float()  # [1, C, h, w]
    img = F.interpolate(img, size=new_grid, mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], c).to(pos_embed.dtype)


class GroupingLayer(nn.Module):
    """One stage: [image tokens, group tokens] through transformer blocks, then an optional GroupingBlock.

    Group tokens are appended **after** the image tokens and get no position embedding. From the second stage on,
    the stage's (zero-initialised) tokens are added to a projection of the previous stage's group tokens
    (`group_projector`: LN + token-mixing MLP), taken after that stage's blocks and before its grouping.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, num_group_token: int, mlp_ratio: float,
                 drop_path: list[float], downsample: GroupingBlock | None, group_projector: nn.Module | None,
                 attn_impl: str = "auto"):
        super().__init__()
        self.num_group_token = num_group_token
        if num_group_token > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_token, dim))
            if group_projector is None:  # reference: zero init only when a projector feeds the tokens
                nn.init.trunc_normal_(self.group_token, std=0.02)
        else:
            self.group_token = None
        self.blocks = nn.ModuleList(AttnBlock(dim, num_heads, mlp_ratio, dp, attn_impl) for dp in drop_path)
        self.downsample = downsample
        self.group_projector = group_projector
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, prev_group_token: torch.Tensor | None, return_soft: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """x [B, L, C] -> (segments [B, S2, C] (or x), group tokens [B, S1, C] after the blocks, soft map,
        image tokens [B, L, C] after the blocks, i.e. what the GroupingBlock groups)."""
        n = x.shape[1]
        if self.group_token is not None:
            group_token = self.group_token.expand(x.shape[0], -1, -1)
            if self.group_projector is not None:
                group_token = group_token + self.group_projector(prev_group_token)
            x = torch.cat([x, group_token], dim=1)  # [B, L + S1, C]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x, group_token = (x[:, :n], x[:, n:]) if self.group_token is not None else (x, None)
        segments, soft = x, None
        if self.downsample is not None:
            segments, soft = self.downsample(x, group_token, return_soft)
        return segments, group_token, soft, x


class GroupViTVisionTransformer(nn.Module):
    """The image encoder (reference class `GroupViT`): tokens [B, G, C] of the final segments, pooled to [B, C].

    With a single stage and no group tokens it is a plain ViT (the paper's "pixel-wise" baseline).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.grid = cfg.grid
        c = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, c)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], c))
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            downsample = projector = None
            if i < cfg.num_stages - 1:
                downsample = GroupingBlock(c, cfg.num_heads[i], cfg.num_group_tokens[i], cfg.num_output_groups[i],
                                           cfg.hard_assignment, cfg.gumbel_tau, cfg.assign_eps, cfg.fused_proj,
                                           cfg.attn_impl, cfg.group_residual)
            if i > 0 and cfg.num_group_tokens[i] > 0:
                # input count = the previous stage's group tokens (reference; the HF port uses its output groups)
                projector = nn.Sequential(nn.LayerNorm(c), MixerMlp(cfg.num_group_tokens[i - 1], c // 2,
                                                                    cfg.num_group_tokens[i]))
            start = sum(cfg.depths[:i])
            self.layers.append(GroupingLayer(c, depth, cfg.num_heads[i], cfg.num_group_tokens[i], cfg.mlp_ratio,
                                             dpr[start:start + depth], downsample, projector, cfg.attn_impl))
        self.norm = nn.LayerNorm(c)
        self.apply(init_weights)  # group tokens and pos_embed are parameters, not touched by apply
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def check_input(self, pixels: torch.Tensor) -> None:
        """Raise ValueError for a wrong layout, channel count, or (in training) image size."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected a [B, 3, H, W] RGB batch, found shape {list(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if self.training and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"pixels: training needs {self.image_size}x{self.image_size} images (model image_size),"
                             f" found {h}x{w}; eval mode accepts other sizes")
        if h < self.patch_size or w < self.patch_size:
            raise ValueError(f"pixels: images must be at least one patch ({self.patch_size} px), found {h}x{w}")

    def forward_features(self, pixels: torch.Tensor, return_soft: bool = False
                         ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int], torch.Tensor]:
        """pixels [B, 3, H, W] -> (final normed tokens [B, G, C], soft maps [B, S2_i, L_i] per grouping, grid,
        the patch tokens [B, h*w, C] the first stage hands to its grouping block (unnormed; the output for a
        plain ViT))."""
        self.check_input(pixels)
        x, grid = self.patch_embed(pixels)  # [B, h*w, C]
        # training asserts the size above, so only eval can reach a different grid
        x = x + resize_pos_embed(self.pos_embed, self.grid, grid)
        group_token, soft_maps, patch_tokens = None, [], None
        for layer in self.layers:
            x, group_token, soft, image_tokens = layer(x, group_token, return_soft)
            if patch_tokens is None:
                patch_tokens = image_tokens
            if soft is not None:
                soft_maps.append(soft)
        return self.norm(x), soft_maps, grid, patch_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> pooled image features [B, C] (mean of the final segment tokens)."""
        return self.forward_features(pixels)[0].mean(dim=1)
