"""GroupViT: image encoder + text encoder + MLP projection heads + learnable logit scales (reference
`MultiLabelContrastive`). Pure: no I/O, no tracking, no process groups (losses live in `groupvit.losses`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from groupvit.model.config import ModelConfig
from groupvit.model.layers import Mlp, set_attn_impl
from groupvit.model.text import TextTransformer
from groupvit.model.vision import GroupViTVisionTransformer, resize_pos_embed

# Pixels are normalised with ImageNet statistics (reference training and evaluation), RGB order.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LOGIT_SCALE = 100.0


class ProjectMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear, on [B, C] or on every token of [B, L, C].

    The reference uses Conv1d(kernel 1) layers (and SyncBatchNorm under DDP); a kernel-1 convolution is a Linear,
    so the names are kept (`linear_hidden.0/1`, `linear_out`) and only the weights' trailing singleton axis differs:
    the checkpoint converter squeezes/unsqueezes it. Batch statistics over [B*L] tokens equal the reference's
    BatchNorm1d over (B, L). The trainer converts BatchNorm1d to SyncBatchNorm under DDP (names unchanged).
    """

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int):
        super().__init__()
        self.linear_hidden = nn.Sequential(nn.Linear(in_dim, inner_dim), nn.BatchNorm1d(inner_dim), nn.ReLU(True))
        self.linear_out = nn.Linear(inner_dim, out_dim)  # Linear's default init equals Conv1d's (reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = self.linear_out(self.linear_hidden(x.reshape(-1, shape[-1])))  # [B*L, D]
        return x.view(*shape[:-1], x.shape[-1])


class GroupViT(nn.Module):
    """GroupViT (Xu et al., CVPR 2022). Parameter names equal the official checkpoints' (docs/checkpoint_names.md).

    Args:
        cfg: the architecture and its performance switches.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.img_encoder = GroupViTVisionTransformer(cfg)
        self.text_encoder = TextTransformer(cfg)
        self.img_projector = ProjectMLP(cfg.embed_dim, cfg.proj_hidden_dim, cfg.output_dim)
        self.text_projector = ProjectMLP(cfg.text_width, cfg.proj_hidden_dim, cfg.output_dim)
        init = math.log(1.0 / cfg.contrast_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.multi_label_logit_scale = nn.Parameter(torch.tensor(init)) if cfg.multi_label else None
        self.set_mlp_recompute_act(cfg.mlp_recompute_act)

    # ----------------------------------------------------------------------------------------------- encoders
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (ImageNet-normalised) -> projected, **unnormalised** embeddings [B, D]."""
        return self.img_projector(self.img_encoder(pixels))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, L] -> projected, **unnormalised** embeddings [N, D]."""
        return self.text_projector(self.text_encoder(tokens))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Training forward: L2-normalised embeddings for the losses.

        Args:
            pixels: [B, 3, H, W].
            tokens: [B, 1+K, L] (caption, then K prompted nouns) or [B, L] (captions only).

        Returns:
            {"image": [B, D], "text": [B, D], "prompts": [B, K, D] or None}, plus "groups" [B, G, D] with
            `multi_label_match: group` and "patches" [B, N, D] with `multi_label_patches` (when there are prompts).
            All B*(1+K) texts are encoded in one pass (one set of BatchNorm statistics, as the reference).
        """
        if tokens.ndim == 2:
            tokens = tokens[:, None]
        if tokens.ndim != 3 or tokens.shape[0] != pixels.shape[0]:
            raise ValueError(f"tokens: expected [B, 1+K, L] with B = {pixels.shape[0]} images, found "
                             f"{list(tokens.shape)}")
        b, n, length = tokens.shape
        match_groups = self.cfg.multi_label_match == "group" and n > 1
        match_patches = self.cfg.multi_label_patches > 0 and self.cfg.has_grouping and n > 1
        groups = patches = None
        if match_groups or match_patches:
            # One projector call over [pooled, groups, patches] [B, 1+G+N, C]: the BatchNorm statistics then cover
            # the group embeddings that zero-shot segmentation scores, not only the pooled ones.
            x, _, _, patch_tokens = self.img_encoder.forward_features(pixels)  # [B, G, C], [B, N, C]
            parts = [x.mean(dim=1, keepdim=True)]
            if match_groups:
                parts.append(x)
            if match_patches:
                parts.append(self.img_encoder.norm(patch_tokens))  # the final LayerNorm, shared with the segments
            z = F.normalize(self.img_projector(torch.cat(parts, dim=1)), dim=-1)
            image = z[:, 0]
            groups = z[:, 1:1 + x.shape[1]] if match_groups else None
            patches = z[:, -patch_tokens.shape[1]:] if match_patches else None
        else:
            image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(tokens.reshape(b * n, length)), dim=-1).view(b, n, -1)
        out = {"image": image, "text": text[:, 0], "prompts": text[:, 1:] if n > 1 else None}
        if groups is not None:
            out["groups"] = groups  # [B, G, D] L2-normalised final segments (patches for the plain ViT)
        if patches is not None:
            out["patches"] = patches  # [B, N, D] L2-normalised patch tokens entering the first grouping block
        return out

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(min(exp(logit_scale), 100), same for the multi-label scale; the main one when there is none)."""
        s = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        if self.multi_label_logit_scale is None:
            return s, s
        return s, self.multi_label_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def segmentation_outputs(self, pixels: torch.Tensor) -> dict[str, Any]:
        """Everything zero-shot segmentation needs, from one forward of the image encoder.

        Returns:
            "image": pooled embedding [B, D]; "groups": embeddings of the final segments [B, G, D] (of the patch
            tokens for the plain-ViT baseline), both L2-normalised; "soft_maps": [A_1 [B, G_1, N_0], ...] with
            softmax over the group axis, A_i assigning the tokens entering grouping block i (empty without
            grouping); "grid": (h, w) patch grid of `pixels`.
        """
        x, soft_maps, grid, _ = self.img_encoder.forward_features(pixels, return_soft=True)  # x [B, G, C]
        image = F.normalize(self.img_projector(x.mean(dim=1)), dim=-1)
        groups = F.normalize(self.img_projector(x), dim=-1)
        return {"image": image, "groups": groups, "soft_maps": soft_maps, "grid": grid}

    # ------------------------------------------------------------------------------------------ switches
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every transformer block of both towers in backward."""
        self.img_encoder.set_grad_checkpointing(enable)
        self.text_encoder.transformer.grad_checkpointing = enable
        self.set_mlp_recompute_act(self.mlp_recompute_act)

    def set_mlp_recompute_act(self, enable: bool = True) -> None:
        """Recompute each image-tower MLP's GELU output in backward instead of keeping it (`layers.Mlp`).

        Not in a checkpointed block: the block's checkpoint keeps nothing of it anyway, and the Mlp's saved-tensor
        hooks, nested in the checkpoint's, would make the checkpoint keep the hidden h of every block."""
        self.mlp_recompute_act = enable
        checkpointed = {id(m) for layer in self.img_encoder.layers if layer.grad_checkpointing
                        for blk in layer.blocks for m in blk.modules()}
        for m in self.modules():
            if isinstance(m, Mlp):
                m.recompute_act = enable and id(m) not in checkpointed

    def set_attn_impl(self, impl: str) -> None:
        """`auto`, `sdpa` (fused kernels) or `eager` (explicit softmax) for every attention but AssignAttention."""
        set_attn_impl(self, impl)

    # --------------------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights; a differently sized `img_encoder.pos_embed` is bicubically resized (as the reference),
        any other mismatch (strict) raises ValueError naming the first mismatched tensor."""
        state_dict = dict(state_dict)
        key = "img_encoder.pos_embed"
        ours = self.img_encoder.pos_embed
        if key in state_dict and state_dict[key].shape != ours.shape and state_dict[key].ndim == 3:
            side = math.isqrt(state_dict[key].shape[1])
            if side * side == state_dict[key].shape[1] and state_dict[key].shape[2] == ours.shape[2]:
                state_dict[key] = resize_pos_embed(state_dict[key], (side, side), self.img_encoder.grid)
        if strict:
            self.check_state_dict(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ValueError naming the first missing, unexpected or differently shaped tensor."""
        expected = self.state_dict()
        for name, tensor in expected.items():
            if name not in state_dict:
                raise ValueError(f"checkpoint does not match the model: missing tensor {name!r} "
                                 f"(shape {list(tensor.shape)}); is it another architecture?")
            if tuple(state_dict[name].shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint does not match the model: tensor {name!r} has shape "
                                 f"{list(state_dict[name].shape)}, the model expects {list(tensor.shape)}")
        for name in state_dict:
            if name not in expected:
                raise ValueError(f"checkpoint does not match the model: unexpected tensor {name!r}")
