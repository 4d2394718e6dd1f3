"""GroupViT losses: hand-computed InfoNCE, the reference multi-label targets, the gathered loss on 2 gloo ranks."""
import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from groupvit.losses import GroupViTLoss, contrastive_loss, multi_label_group_loss, multi_label_loss
from groupvit.model import GroupViT, ModelConfig


def features(b: int, k: int, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    prompts = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    return {"image": image, "text": text, "prompts": prompts}


def test_world_size_one_equals_hand_computed_cross_entropy():
    f = features(3, 2)
    s = torch.tensor(10.0, dtype=torch.float64)
    img, txt = f["image"].tolist(), f["text"].tolist()

    def ce(rows, cols):  # mean over rows of -log softmax at the diagonal, written out by hand
        total = 0.0
        for i, r in enumerate(rows):
            logits = [10.0 * sum(a * b for a, b in zip(r, c, strict=True)) for c in cols]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
        return total / len(rows)

    expected = 0.5 * (ce(img, txt) + ce(txt, img))
    out = GroupViTLoss(multi_label=False)(f, s)
    assert out["loss_itc"].item() == pytest.approx(expected, rel=1e-12)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12) and out["loss_ml"].item() == 0.0


def reference_multi_label_targets(b: int, k: int, rank: int, world: int):
    """Dense targets built the way `multi_label_contrastive.py` builds them (one_hot of the rank x 1/K x eye)."""
    per_img = F.one_hot(torch.full((b, 1, b, k), rank), world).double()  # [B, L1, B, L2, W]
    per_img *= (torch.ones(b, 1, k) / k)[:, :, None, :, None] * torch.eye(b).double()[:, None, :, None, None]
    per_img = per_img.permute(0, 1, 4, 2, 3).reshape(b, world * b * k)  # (b1 l1) (w b2 l2)
    per_txt = F.one_hot(torch.full((b, k, b, 1), rank), world).double()  # [B, L2, B, L1, W]
    per_txt *= torch.ones(b, k, 1)[:, :, None, :, None] * torch.eye(b).double()[:, None, :, None, None]
    per_txt = per_txt.permute(0, 1, 4, 2, 3).reshape(b * k, world * b)  # (b2 l2) (w b1 l1)
    return per_img, per_txt


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2), (0, 3)])
def test_multi_label_loss_uses_the_reference_targets(rank, world):
    b, k = 3, 2
    mine = features(b, k, seed=1)
    others = [features(b, k, seed=10 + r) for r in range(world)]
    others[rank] = mine

    def gather(x):  # stands in for the all-gather: other ranks' rows, this rank's at its offset
        key = "image" if x.shape[0] == b else "prompts"
        return torch.cat([o[key].reshape(x.shape) for o in others])

    s = torch.tensor(7.0, dtype=torch.float64)
    got = multi_label_loss(mine["image"], mine["prompts"], s, rank, gather)
    y_img, y_txt = reference_multi_label_targets(b, k, rank, world)
    all_prompts = torch.cat([o["prompts"].reshape(b * k, -1) for o in others])
    all_images = torch.cat([o["image"] for o in others])
    soft_ce = lambda logits, y: (-(y * logits.log_softmax(-1)).sum(-1)).mean()  # noqa: E731 (timm SoftTargetCE)
    expected = 0.5 * (soft_ce(s * mine["image"] @ all_prompts.t(), y_img)
                      + soft_ce(s * mine["prompts"].reshape(b * k, -1) @ all_images.t(), y_txt))
    torch.testing.assert_close(got, expected)


def test_total_is_itc_plus_weighted_multi_label_and_uses_the_multi_label_scale():
    f = features(4, 3)
    s, s_ml = torch.tensor(5.0, dtype=torch.float64), torch.tensor(9.0, dtype=torch.float64)
    out = GroupViTLoss(multi_label=True, multi_label_weight=0.5)(f, s, s_ml)
    torch.testing.assert_close(out["loss_itc"], contrastive_loss(f["image"], f["text"], s))
    torch.testing.assert_close(out["loss_ml"], multi_label_loss(f["image"], f["prompts"], s_ml))
    torch.testing.assert_close(out["loss"], out["loss_itc"] + 0.5 * out["loss_ml"])


def test_group_multi_label_loss_scores_an_image_by_its_best_group():
    b, k, g, d = 3, 2, 4, 8
    f = features(b, k, d, seed=2)
    gen = torch.Generator().manual_seed(3)
    groups = F.normalize(torch.randn(b, g, d, generator=gen, dtype=torch.float64), dim=-1)
    s = torch.tensor(6.0, dtype=torch.float64)
    prompts = f["prompts"].reshape(b * k, d).tolist()
    sim = [[max(sum(x * y for x, y in zip(groups[i, j].tolist(), p, strict=True)) for j in range(g)) for p in prompts]
           for i in range(b)]  # [B, B*K]: best group of image i for every prompt, written out
    sim = torch.tensor(sim, dtype=torch.float64)
    y_img, y_txt = reference_multi_label_targets(b, k, 0, 1)
    soft_ce = lambda logits, y: (-(y * logits.log_softmax(-1)).sum(-1)).mean()  # noqa: E731
    expected = 0.5 * (soft_ce(s * sim, y_img) + soft_ce(s * sim.t(), y_txt))
    torch.testing.assert_close(multi_label_group_loss(groups, f["prompts"], s), expected)
    # one group per image is the reference loss on the pooled embedding
    torch.testing.assert_close(multi_label_group_loss(f["image"][:, None], f["prompts"], s),
                               multi_label_loss(f["image"], f["prompts"], s))
    # GroupViTLoss takes the group path exactly when the outputs carry groups
    out = GroupViTLoss()({**f, "groups": groups}, s)
    torch.testing.assert_close(out["loss_ml"], expected)


def test_patch_term_adds_the_best_patch_loss_with_its_weight_and_only_with_patches():
    b, k, d = 3, 2, 8
    f = features(b, k, d, seed=4)
    gen = torch.Generator().manual_seed(5)
    groups = F.normalize(torch.randn(b, 4, d, generator=gen, dtype=torch.float64), dim=-1)
    patches = F.normalize(torch.randn(b, 9, d, generator=gen, dtype=torch.float64), dim=-1)
    s, s_ml = torch.tensor(6.0, dtype=torch.float64), torch.tensor(8.0, dtype=torch.float64)
    on_groups = multi_label_group_loss(groups, f["prompts"], s_ml)
    on_patches = multi_label_group_loss(patches, f["prompts"], s_ml)
    assert not torch.isclose(on_groups, on_patches)
    out = GroupViTLoss(multi_label_weight=0.5, patch_weight=2.0)({**f, "groups": groups, "patches": patches}, s, s_ml)
    torch.testing.assert_close(out["loss_ml"], on_groups + 2.0 * on_patches)
    torch.testing.assert_close(out["loss"], out["loss_itc"] + 0.5 * out["loss_ml"])
    # weight 0, or no patches in the outputs: the group loss alone
    for loss_fn, outputs in ((GroupViTLoss(patch_weight=0.0), {**f, "groups": groups, "patches": patches}),
                             (GroupViTLoss(patch_weight=2.0), {**f, "groups": groups})):
        torch.testing.assert_close(loss_fn(outputs, s, s_ml)["loss_ml"], on_groups)


@pytest.mark.parametrize("rank, world", [(1, 2), (0, 3)])
def test_group_multi_label_loss_gathers_groups_of_every_rank(rank, world):
    b, k, g, d = 2, 2, 3, 8
    gen = torch.Generator().manual_seed(4)
    ranks = [{"groups": F.normalize(torch.randn(b, g, d, generator=gen, dtype=torch.float64), dim=-1),
              "prompts": F.normalize(torch.randn(b, k, d, generator=gen, dtype=torch.float64), dim=-1)}
             for _ in range(world)]
    mine = ranks[rank]

    def gather(x):
        key = "groups" if x.ndim == 3 else "prompts"
        return torch.cat([o[key].reshape(-1, *x.shape[1:]) for o in ranks])

    s = torch.tensor(5.0, dtype=torch.float64)
    got = multi_label_group_loss(mine["groups"], mine["prompts"], s, rank, gather)
    all_groups = torch.cat([o["groups"] for o in ranks])  # [W*B, G, D]
    all_prompts = torch.cat([o["prompts"].reshape(b * k, d) for o in ranks])  # [W*B*K, D]
    sim = torch.einsum("bgd,nd->bgn", all_groups, all_prompts).amax(1)  # [W*B, W*B*K]
    rows = slice(rank * b, rank * b + b)
    cols = slice(rank * b * k, rank * b * k + b * k)
    y_img, y_txt = reference_multi_label_targets(b, k, rank, world)
    soft_ce = lambda logits, y: (-(y * logits.log_softmax(-1)).sum(-1)).mean()  # noqa: E731
    expected = 0.5 * (soft_ce(s * sim[rows], y_img) + soft_ce(s * sim[:, cols].t(), y_txt))
    torch.testing.assert_close(got, expected)


def test_logit_scale_is_clamped_at_100_and_the_multi_label_scale_is_separate():
    model = GroupViT(ModelConfig(preset="tiny", depths=(1, 1, 1), text_layers=1))
    torch.testing.assert_close(model.logit_scales()[0], torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(200.0))
    s, s_ml = model.logit_scales()
    assert s.item() == pytest.approx(100.0) and s_ml.item() == pytest.approx(1 / 0.07)
    s.backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further
    no_ml = GroupViT(ModelConfig(preset="tiny", depths=(1, 1, 1), text_layers=1, multi_label=False))
    assert no_ml.multi_label_logit_scale is None and "multi_label_logit_scale" not in no_ml.state_dict()


# ------------------------------------------------------------------------------------------ 2 gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", FutureWarning)  # no deprecated collective in the gather
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = features(2 * world, 3, seed=5)
        local = {k: v[2 * rank: 2 * rank + 2].clone().requires_grad_(True) for k, v in full.items()}
        s = torch.tensor(8.0, dtype=torch.float64)
        out = GroupViTLoss(multi_label=True)(local, s, s * 1.5, rank=rank, world_size=world)
        out["loss"].backward()
        torch.save({"loss": out["loss"].detach(), "loss_ml": out["loss_ml"].detach(),
                    "grads": {k: v.grad for k, v in local.items()}}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_on_two_gloo_ranks_equals_the_single_process_loss(tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(world)]
    full = {k: v.clone().requires_grad_(True) for k, v in features(2 * world, 3, seed=5).items()}
    s = torch.tensor(8.0, dtype=torch.float64)
    ref = GroupViTLoss(multi_label=True)(full, s, s * 1.5)
    ref["loss"].backward()
    # the mean of the ranks' losses (what DDP optimises) is the loss of the concatenated batch
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / world, ref["loss"].detach())
    torch.testing.assert_close(sum(r["loss_ml"] for r in ranks) / world, ref["loss_ml"].detach())
    # each rank's feature gradient sums every rank's loss through the gather; DDP then averages by world size
    for key in ("image", "text", "prompts"):
        got = torch.cat([r["grads"][key] for r in ranks]) / world
        torch.testing.assert_close(got, full[key].grad)
