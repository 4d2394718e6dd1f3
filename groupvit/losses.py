"""GroupViT losses: symmetric InfoNCE over the global batch, plus the multi-label loss on K prompted nouns.

Both follow `models/multi_label_contrastive.py` of the reference: features of the other ranks are gathered
**with gradients** (each rank computes the loss of its own rows against all columns), labels are offset by the rank,
and the multi-label targets are 1/K on an image's own K prompts and one-hot on a prompt's own image.

The loss never asks `torch.distributed` who it is: `rank`, `world_size` and (optionally) `all_gather` are passed in,
so it runs, and is tested, without a process group.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

AllGather = Callable[[torch.Tensor], torch.Tensor]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather in forward; backward sums the gradients of every rank's copy and keeps this rank's rows.

    Public collectives only: `torch.distributed.nn.functional.all_gather` does the same but is deprecated
    (FutureWarning in torch 2.13, slated for removal).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist  # imported lazily: the model package stays process-free

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss reaches this rank's rows (gloo has no reduce_scatter)
        return grad[ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] on every rank -> [W*B, ...] in rank order; backward sums the gradients of all ranks' copies."""
    return _AllGatherWithGrad.apply(x)


class GroupViTLoss(nn.Module):
    """L = L_itc + multi_label_weight * L_ml (reference: every loss key is summed; weight 1.0).

    L_ml matches the prompted nouns with the pooled image (reference) or, when the outputs carry "groups", with the
    image's best segment; when they carry "patches", `patch_weight` times the same loss on the patch tokens
    entering the first grouping block is added to L_ml (`model.multi_label_patches`, a departure).

    Args:
        multi_label: add the multi-label loss when the outputs carry prompts.
        multi_label_weight: its weight.
        patch_weight: weight of the patch-token term inside L_ml (used only when the outputs carry "patches").
    """

    def __init__(self, multi_label: bool = True, multi_label_weight: float = 1.0, patch_weight: float = 0.0):
        super().__init__()
        self.multi_label = multi_label
        self.multi_label_weight = multi_label_weight
        self.patch_weight = patch_weight

    def forward(self, outputs: dict[str, torch.Tensor | None], logit_scale: torch.Tensor,
                ml_logit_scale: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                all_gather: AllGather | None = None) -> dict[str, torch.Tensor]:
        """Compute the losses of this rank's rows.

        Args:
            outputs: `GroupViT.forward` output: L2-normalised "image" [B, D], "text" [B, D], "prompts" [B, K, D] or
                None, optionally "groups" [B, G, D] and "patches" [B, N, D].
            logit_scale: the clamped scale min(exp(logit_scale), 100) (`model.logit_scales()[0]`).
            ml_logit_scale: the same for the multi-label loss (`model.logit_scales()[1]`).
            rank: this process's rank.
            world_size: number of processes; > 1 gathers features from all ranks.
            all_gather: gather [B, ...] -> [W*B, ...] with gradients; default `torch.distributed.nn` all_gather.

        Returns:
            {"loss", "loss_itc", "loss_ml"} (scalar tensors; loss_ml is 0 without prompts or multi_label).
        """
        gather = _resolve_gather(world_size, all_gather)
        image, text, prompts = outputs["image"], outputs["text"], outputs.get("prompts")
        loss_itc = contrastive_loss(image, text, logit_scale, rank, gather)
        if self.multi_label and prompts is not None and prompts.shape[1] > 0:
            scale = logit_scale if ml_logit_scale is None else ml_logit_scale
            groups = outputs.get("groups")
            if groups is not None:
                loss_ml = multi_label_group_loss(groups, prompts, scale, rank, gather)
            else:
                loss_ml = multi_label_loss(image, prompts, scale, rank, gather)
            patches = outputs.get("patches")
            if patches is not None and self.patch_weight > 0:
                loss_ml = loss_ml + self.patch_weight * multi_label_group_loss(patches, prompts, scale, rank, gather)
            loss = loss_itc + self.multi_label_weight * loss_ml
        else:
            loss_ml = torch.zeros((), dtype=loss_itc.dtype, device=loss_itc.device)
            loss = loss_itc
        return {"loss": loss, "loss_itc": loss_itc, "loss_ml": loss_ml}


def _full(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 features from autocast; float64 stays float64 for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _resolve_gather(world_size: int, all_gather: AllGather | None) -> AllGather:
    if all_gather is not None:
        return all_gather
    if world_size > 1:
        return all_gather_with_grad
    return lambda x: x


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, rank: int = 0,
                     gather: AllGather = lambda x: x) -> torch.Tensor:
    """Symmetric InfoNCE: 0.5 * [CE(s I gather(T)^T, own) + CE(s T gather(I)^T, own)]; I, T [B, D] normalised."""
    b = image.shape[0]
    labels = torch.arange(b, device=image.device) + b * rank  # own pair in the gathered columns
    logits_img = scale * _full(image) @ _full(gather(text)).t()  # [B, W*B]
    logits_txt = scale * _full(text) @ _full(gather(image)).t()  # [B, W*B]
    return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))


def multi_label_loss(image: torch.Tensor, prompts: torch.Tensor, scale: torch.Tensor, rank: int = 0,
                     gather: AllGather = lambda x: x) -> torch.Tensor:
    """Multi-label contrastive loss between pooled images [B, D] and their K prompted nouns [B, K, D].

    Image rows: soft target 1/K on the image's own K prompts among all W*B*K gathered prompts. Prompt rows:
    one-hot on the prompt's own image among all W*B gathered images. Soft-target cross-entropy (row mean of
    -sum y log softmax) on both, averaged. Identical prompts of other images count as negatives (no
    de-duplication, as the reference).
    """
    b, k, _ = prompts.shape
    prompts = prompts.reshape(b * k, -1)
    logits_img = scale * _full(image) @ _full(gather(prompts)).t()  # [B, W*B*K]
    logits_txt = scale * _full(prompts) @ _full(gather(image)).t()  # [B*K, W*B]
    return _multi_label_ce(logits_img, logits_txt, k, rank)


def multi_label_group_loss(groups: torch.Tensor, prompts: torch.Tensor, scale: torch.Tensor, rank: int = 0,
                           gather: AllGather = lambda x: x) -> torch.Tensor:
    """`multi_label_loss` with an image's similarity to a prompt taken as the max over its groups [B, G, D].

    A departure from the reference (`model.multi_label_match: group`): a noun must be matched by one segment of
    the image rather than by the pooled embedding, so segments, the unit zero-shot segmentation names, are
    trained to carry their own class. Image rows and prompt rows as in `multi_label_loss`.
    """
    b, k, _ = prompts.shape
    prompts = prompts.reshape(b * k, -1)
    all_prompts, all_groups = _full(gather(prompts)), _full(gather(groups))
    logits_img = scale * torch.einsum("bgd,nd->bgn", _full(groups), all_prompts).amax(dim=1)  # [B, W*B*K]
    logits_txt = scale * torch.einsum("nd,bgd->nbg", _full(prompts), all_groups).amax(dim=2)  # [B*K, W*B]
    return _multi_label_ce(logits_img, logits_txt, k, rank)


def _multi_label_ce(logits_img: torch.Tensor, logits_txt: torch.Tensor, k: int, rank: int) -> torch.Tensor:
    """The multi-label targets on this rank's rows: logits_img [B, W*B*K], logits_txt [B*K, W*B]."""
    b, device = logits_img.shape[0], logits_img.device
    # image b's own prompts are columns (rank*B + b)*K + j, j < K; the soft CE is the mean of their -log p
    own = (torch.arange(b, device=device)[:, None] + b * rank) * k + torch.arange(k, device=device)
    loss_img = -logits_img.log_softmax(dim=-1).gather(1, own).mean(dim=1).mean()
    labels_txt = (torch.arange(b, device=device) + b * rank).repeat_interleave(k)  # prompt (b, j) -> image b
    return 0.5 * (loss_img + F.cross_entropy(logits_txt, labels_txt))
