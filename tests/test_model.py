"""GroupViT model: shapes, gradients, reference semantics of grouping, bad input, and every speed switch == plain."""
import dataclasses

import pytest
import torch

from groupvit.config import build
from groupvit.errors import ConfigError
from groupvit.losses import GroupViTLoss
from groupvit.model import GroupViT, ModelConfig, autocast, compile_model, count_params, flops_per_sample
from groupvit.model.grouping import AssignAttention, GroupingBlock, gumbel_noise

SOT, EOT = 49406, 49407
TINY = dict(preset="tiny", image_size=32, patch_size=8, embed_dim=32, depths=(1, 1, 1), num_heads=(2, 2, 2),
            num_group_tokens=(8, 4, 0), num_output_groups=(8, 2), text_width=32, text_layers=2, text_heads=2,
            context_length=16, output_dim=16, proj_hidden_dim=48)


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def tokens(n: int, k: int = 0, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids with SOT first and EOT at a random position, zero padded: [n, L] or [n, 1+k, L]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, SOT, (n * (1 + k), length), generator=g)
    t[:, 0] = SOT
    ends = torch.randint(1, length, (n * (1 + k),), generator=g)
    for i, e in enumerate(ends.tolist()):
        t[i, e] = EOT
        t[i, e + 1:] = 0
    return t.view(n, 1 + k, length) if k else t


def pixels(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_step(model: GroupViT, x: torch.Tensor, t: torch.Tensor, seed: int = 0, precision: str = "fp32"):
    """Forward + both losses (under `precision`'s autocast) + backward (outside it, as `fit` runs it) under a fixed
    seed; returns (outputs, loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with autocast(precision):
        out = model(x, t)
        loss = GroupViTLoss(multi_label=True)(out, *model.logit_scales())["loss"]
    loss.backward()
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def twin(model: GroupViT, **changes) -> GroupViT:
    """Same weights, different (performance) config."""
    other = GroupViT(dataclasses.replace(model.cfg, **changes))
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


def assert_close_grads(a, b, rel=1e-5):
    """Gradients equal up to float noise on the scale of the largest gradient (parameters whose true gradient is
    zero, e.g. biases followed by a normalisation, carry only that noise)."""
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=rel * scale, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")


def assert_close_dicts(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------- config
def test_presets_fill_unset_keys_and_overrides_win():
    c = build(ModelConfig, {"preset": "gcc_yfcc", "depths": [6, 3, 2]}, "params.yaml: model")
    assert (c.embed_dim, c.depths, c.num_group_tokens, c.num_output_groups) == (384, (6, 3, 2), (64, 8, 0), (64, 8))
    assert (c.text_width, c.text_layers, c.context_length, c.output_dim, c.patch_size) == (256, 12, 77, 256, 16)
    tiny = build(ModelConfig, {}, "m")
    assert tiny.preset == "tiny" and tiny.image_size == 64 and tiny.num_group_tokens == (16, 4, 0)
    resolved = dataclasses.asdict(c)  # the resolved config rebuilds to itself (saved beside checkpoints)
    assert build(ModelConfig, {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}, "m") == c


@pytest.mark.parametrize("section, needle", [
    ({"depths": [2, 2]}, "one entry per stage"),
    ({"num_heads": [3, 3, 3]}, "do not divide embed_dim"),
    ({"num_group_tokens": [16, 4, 2]}, "last stage"),
    ({"num_output_groups": [16]}, "num_output_groups"),
    ({"patch_size": 7}, "patch_size"),
    ({"preset": "huge"}, "preset"),
    ({"widht": 3}, "unknown key"),
    ({"text_heads": 3}, "text_width"),
])
def test_config_rejects_inconsistent_architectures(section, needle):
    with pytest.raises(ConfigError, match=needle):
        build(ModelConfig, section, "params.yaml: model")


def test_param_count_and_flops_match_the_reference_figures():
    big = ModelConfig(preset="gcc_yfcc")
    assert count_params(big) == 55_726_610  # 55.73 M (the released GroupViT-S) + the multi-label scale
    assert flops_per_sample(big, 0, train=False) == pytest.approx(9.47e9, rel=2e-3)
    assert flops_per_sample(big, 3, train=True) == pytest.approx(42.2e9, rel=2e-3)
    for c in (cfg(), cfg(depths=(2,), num_heads=(2,), num_group_tokens=(0,), num_output_groups=())):
        assert count_params(c) == sum(p.numel() for p in GroupViT(c).parameters())


def test_released_architecture_has_the_official_tensor_shapes():
    sd = GroupViT(ModelConfig(preset="gcc_yfcc")).state_dict()
    expected = {
        "img_encoder.patch_embed.proj.weight": [384, 3, 16, 16], "img_encoder.pos_embed": [1, 196, 384],
        "img_encoder.layers.0.group_token": [1, 64, 384], "img_encoder.layers.1.group_token": [1, 8, 384],
        "img_encoder.layers.0.blocks.5.attn.qkv.weight": [1152, 384],
        "img_encoder.layers.0.downsample.mlp_inter.fc1.weight": [192, 64],
        "img_encoder.layers.1.downsample.mlp_inter.fc2.weight": [8, 192],
        "img_encoder.layers.1.downsample.pre_assign_attn.norm_post.weight": [384],
        "img_encoder.layers.1.downsample.assign.k_proj.weight": [384, 384],
        "img_encoder.layers.1.downsample.mlp_channels.fc1.weight": [1536, 384],
        "img_encoder.layers.1.group_projector.1.fc1.weight": [192, 64],
        "img_encoder.layers.2.blocks.2.mlp.fc2.weight": [384, 1536], "img_encoder.norm.bias": [384],
        "text_encoder.token_embedding.weight": [49408, 256], "text_encoder.positional_embedding": [77, 256],
        "text_encoder.transformer.resblocks.11.attn.in_proj_weight": [768, 256],
        "text_encoder.transformer.resblocks.11.attn.out_proj.weight": [256, 256],
        "text_encoder.transformer.resblocks.0.mlp.c_fc.weight": [1024, 256], "text_encoder.ln_final.weight": [256],
        "img_projector.linear_hidden.0.weight": [4096, 384], "img_projector.linear_hidden.1.running_var": [4096],
        "img_projector.linear_out.weight": [256, 4096], "text_projector.linear_hidden.0.weight": [4096, 256],
        "logit_scale": [], "multi_label_logit_scale": [],
    }
    assert {k: list(sd[k].shape) for k in expected} == expected
    assert "img_encoder.layers.2.group_token" not in sd and not any("norm_q" in k for k in sd)
    assert sd["img_encoder.layers.1.group_token"].abs().sum() == 0  # zero init: fed by the projector


# ---------------------------------------------------------------------------------------------- forward/backward
def test_training_forward_shapes_norms_and_every_parameter_gets_a_gradient():
    model = GroupViT(cfg(drop_path_rate=0.1)).train()
    out, loss, grads = train_step(model, pixels(4), tokens(4, k=3))
    assert out["image"].shape == (4, 16) and out["text"].shape == (4, 16) and out["prompts"].shape == (4, 3, 16)
    for v in out.values():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[:-1]))
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if n not in grads or not grads[n].abs().sum() > 0]
    assert missing == []


def test_group_matching_returns_the_segments_that_segmentation_scores():
    model = GroupViT(cfg(multi_label_match="group")).train()
    out, loss, grads = train_step(model, pixels(4), tokens(4, k=3))
    assert out["groups"].shape == (4, 2, 16) and torch.isfinite(loss)  # the test model ends with 2 segments
    assert "img_encoder.layers.0.group_token" in grads  # the loss reaches the grouping through the segments
    model.eval()  # BatchNorm on running statistics: each row is projected on its own
    with torch.no_grad():
        out, seg = model(pixels(2), tokens(2, k=2)), model.segmentation_outputs(pixels(2))
    torch.testing.assert_close(out["image"], seg["image"])
    torch.testing.assert_close(out["groups"], seg["groups"])
    assert "groups" not in GroupViT(cfg()).eval()(pixels(2), tokens(2, k=2))  # reference: pooled only
    plain = GroupViT(cfg(depths=(2,), num_heads=(2,), num_group_tokens=(0,), num_output_groups=(),
                         multi_label_match="group")).eval()
    assert plain(pixels(2), tokens(2, k=2))["groups"].shape == (2, 16, 16)  # the baseline's segments: 4x4 patches


def test_patch_matching_returns_the_tokens_the_first_grouping_block_receives():
    model = GroupViT(cfg(multi_label_match="group", multi_label_patches=1.0)).train()
    out = model(pixels(4), tokens(4, k=3))
    assert out["patches"].shape == (4, 16, 16) and out["groups"].shape == (4, 2, 16)  # 4x4 patches, 2 segments
    # the patch term trains the blocks before grouping and not the grouping block (eval: BatchNorm on running
    # statistics, which in training would couple the patch rows to the segment rows of the same projector call)
    model.eval().zero_grad(set_to_none=True)
    out = model(pixels(4), tokens(4, k=3))
    frozen = {key: out[key].detach() for key in ("image", "text", "groups")}
    GroupViTLoss(patch_weight=1.0)({**out, **frozen}, *model.logit_scales())["loss_ml"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "img_encoder.layers.0.blocks.0.attn.qkv.weight" in grads and "img_encoder.norm.weight" in grads
    assert not any(n.startswith("img_encoder.layers.0.downsample") for n in grads)
    model.eval()
    captured = {}
    model.img_encoder.layers[0].downsample.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        out, seg = model(pixels(2), tokens(2, k=2)), model.segmentation_outputs(pixels(2))
        expected = model.img_projector(model.img_encoder.norm(captured["x"]))
    torch.testing.assert_close(out["patches"], torch.nn.functional.normalize(expected, dim=-1))
    torch.testing.assert_close(out["groups"], seg["groups"])  # segmentation is unchanged by the switch
    assert "patches" not in GroupViT(cfg(multi_label_match="group")).eval()(pixels(2), tokens(2, k=2))
    assert "patches" not in model(pixels(2), tokens(2))  # captions only: no nouns to match


def test_captions_only_tokens_give_no_prompts_and_text_matches_encode_text():
    model = GroupViT(cfg()).eval()
    t = tokens(3)
    out = model(pixels(3), t)
    assert out["prompts"] is None
    torch.testing.assert_close(out["text"], torch.nn.functional.normalize(model.encode_text(t), dim=-1))


def test_eval_accepts_other_sizes_and_segmentation_outputs_are_consistent():
    model = GroupViT(cfg()).eval()
    with torch.no_grad():
        seg = model.segmentation_outputs(pixels(2, size=48)[..., :40])  # 48 x 40 -> grid 6 x 5
        same = model.segmentation_outputs(pixels(2))
    assert seg["grid"] == (6, 5) and seg["groups"].shape == (2, 2, 16) and seg["image"].shape == (2, 16)
    assert [tuple(a.shape) for a in seg["soft_maps"]] == [(2, 8, 30), (2, 2, 8)]
    for a in seg["soft_maps"]:
        torch.testing.assert_close(a.sum(dim=1), torch.ones(a.shape[0], a.shape[2]))  # softmax over groups
    torch.testing.assert_close(same["image"], torch.nn.functional.normalize(model.encode_image(pixels(2)), dim=-1))


def test_pixel_wise_baseline_without_grouping_is_a_plain_vit():
    model = GroupViT(cfg(depths=(2,), num_heads=(2,), num_group_tokens=(0,), num_output_groups=())).eval()
    with torch.no_grad():
        seg = model.segmentation_outputs(pixels(2))
        x, _, _, _ = model.img_encoder.forward_features(pixels(2))
    assert seg["soft_maps"] == [] and seg["groups"].shape == (2, 16, 16) and x.shape == (2, 16, 32)
    torch.testing.assert_close(model.img_encoder(pixels(2)), x.mean(dim=1))


def test_one_stage_grouping_variant():
    model = GroupViT(cfg(depths=(1, 1), num_heads=(2, 2), num_group_tokens=(8, 0), num_output_groups=(3,))).eval()
    seg = model.segmentation_outputs(pixels(2))
    assert seg["groups"].shape == (2, 3, 16) and [tuple(a.shape) for a in seg["soft_maps"]] == [(2, 3, 16)]


def test_bad_input_raises_clear_errors():
    model = GroupViT(cfg()).train()
    with pytest.raises(ValueError, match="training needs 32x32"):
        model(pixels(2, size=48), tokens(2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(2, 1, 32, 32), tokens(2))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.eval().encode_image(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="context length 20"):
        model.encode_text(tokens(2, length=20))
    with pytest.raises(ValueError, match="B = 2 images"):
        model(pixels(2), tokens(3))


def test_empty_caption_sot_eot_encodes_to_finite_embeddings():
    model = GroupViT(cfg()).eval()
    t = torch.zeros(2, 16, dtype=torch.long)
    t[:, 0], t[:, 1] = SOT, EOT
    t[1, 1:4] = torch.tensor([320, 1929, EOT])
    feats = model.text_encoder(t)
    assert torch.isfinite(feats).all() and not torch.allclose(feats[0], feats[1])


def test_checkpoint_of_another_architecture_names_the_first_mismatched_tensor():
    small = GroupViT(cfg())
    other = GroupViT(cfg(num_group_tokens=(6, 4, 0)))
    with pytest.raises(ValueError, match=r"'img_encoder\.layers\.0\.group_token' has shape \[1, 6, 32\]"):
        small.load_state_dict(other.state_dict())
    sd = small.state_dict()
    sd.pop("logit_scale")
    with pytest.raises(ValueError, match="missing tensor 'logit_scale'"):
        small.load_state_dict(sd)
    # a checkpoint trained at another resolution loads with its position embedding resized (reference behaviour)
    bigger = GroupViT(cfg(image_size=64))
    bigger.load_state_dict(small.state_dict())
    assert bigger.img_encoder.pos_embed.shape == (1, 64, 32)


# --------------------------------------------------------------------------------------------------- grouping
def test_assignment_is_one_hot_over_groups_in_eval_gumbel_in_training_and_softmax_when_soft():
    torch.manual_seed(0)
    raw = torch.randn(2, 4, 10, requires_grad=True)
    hard = AssignAttention(8, hard=True, gumbel_tau=0.5)
    a_eval = hard.eval().assignment(raw)
    torch.testing.assert_close(a_eval.detach(), torch.nn.functional.one_hot(raw.argmax(1), 4).transpose(1, 2).float())
    # Straight-through: the forward value is the one-hot, the gradient is the soft assignment's. The upstream gradient
    # must vary over the groups: the gradient of a column-softmax's plain sum is zero whatever the estimator.
    upstream = torch.randn(2, 4, 10)
    (soft_grad,) = torch.autograd.grad((raw.softmax(dim=1) * upstream).sum(), raw)
    assert soft_grad.abs().max() > 1e-2
    torch.testing.assert_close(torch.autograd.grad((a_eval * upstream).sum(), raw)[0], soft_grad)
    # training: the same with the Gumbel-perturbed, tempered scores (the same noise drawn again from the same seed)
    torch.manual_seed(1)
    a_train = hard.train().assignment(raw)
    torch.manual_seed(1)
    y_soft = ((raw + gumbel_noise(raw)) / 0.5).softmax(dim=1)  # [2, 4, 10]
    torch.testing.assert_close(a_train.detach(),
                               torch.nn.functional.one_hot(y_soft.argmax(1), 4).transpose(1, 2).float())
    torch.testing.assert_close(torch.autograd.grad((a_train * upstream).sum(), raw)[0],
                               torch.autograd.grad((y_soft * upstream).sum(), raw)[0])
    draws = [hard.train().assignment(raw.detach()) for _ in range(5)]
    for a in draws:
        assert set(a.unique().tolist()) <= {0.0, 1.0} and (a.sum(dim=1) == 1).all()
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # Gumbel noise changes the assignment
    soft = AssignAttention(8, hard=False).train().assignment(raw.detach())
    torch.testing.assert_close(soft, raw.detach().softmax(dim=1))


def test_grouping_output_is_the_count_normalised_mean_of_assigned_values():
    torch.manual_seed(0)
    block = AssignAttention(8, hard=True, assign_eps=1.0).eval()
    q, x = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    out, soft = block(q, x, return_soft=True)
    raw = (block.q_proj(q) @ block.k_proj(x).transpose(1, 2)) * 8 ** -0.5  # [1, 3, 5]
    onehot = torch.nn.functional.one_hot(raw.argmax(dim=1), 3).transpose(1, 2).float()
    expected = block.proj((onehot / (onehot.sum(-1, keepdim=True) + 1)) @ block.v_proj(x))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(soft, raw.softmax(dim=1))


def test_group_residual_scales_the_group_tokens_added_to_the_merged_tokens():
    torch.manual_seed(0)
    x, tokens_in = torch.randn(2, 9, 16), torch.randn(2, 4, 16)
    seen = {}
    reference = GroupingBlock(16, 2, 4, 3, hard=False).eval()
    reference.pre_assign_attn.register_forward_hook(lambda m, a, out: seen.update(groups=out))
    reference.assign.register_forward_hook(lambda m, a, out: seen.update(merged=out[0]))
    reference.norm_new_x.register_forward_pre_hook(lambda m, a: seen.update(new_x=a[0]))
    with torch.no_grad():
        reference(x, tokens_in)
        torch.testing.assert_close(seen["new_x"], seen["merged"] + seen["groups"])  # the reference residual
        for scale in (0.3, 0.0):
            block = GroupingBlock(16, 2, 4, 3, hard=False, group_residual=scale).eval()
            block.load_state_dict(reference.state_dict())
            block.norm_new_x.register_forward_pre_hook(lambda m, a: seen.update(new_x=a[0]))
            block(x, tokens_in)
            torch.testing.assert_close(seen["new_x"], seen["merged"] + scale * seen["groups"])
    model = GroupViT(cfg(group_residual=0.3))
    assert all(layer.downsample.group_residual == 0.3 for layer in model.img_encoder.layers[:-1])


def test_hard_and_soft_assignment_models_both_train():
    for hard in (True, False):
        model = GroupViT(cfg(hard_assignment=hard)).train()
        _, loss, grads = train_step(model, pixels(4), tokens(4, k=1))
        assert torch.isfinite(loss) and grads["img_encoder.layers.0.downsample.assign.q_proj.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------- speed switches == plain
@pytest.mark.parametrize("change", [dict(attn_impl="eager"), dict(attn_impl="sdpa"), dict(fused_proj=False),
                                    dict(trim_text_padding=False), dict(grad_checkpointing=True)])
def test_speed_switch_matches_the_plain_path_in_training(change):
    # float64: the paths agree to ~1e-12 (in float32 the tiny random net amplifies rounding in a few gradients)
    model = GroupViT(cfg(drop_path_rate=0.2)).double().train()  # stochastic depth + Gumbel: same seed, same draws
    x, t = pixels(4).double(), tokens(4, k=2)
    out_a, loss_a, grads_a = train_step(model, x, t, seed=3)
    out_b, loss_b, grads_b = train_step(twin(model, **change).double(), x, t, seed=3)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-10, rtol=1e-10)
    assert_close_dicts(out_a, out_b, atol=1e-10, rtol=1e-10)
    assert_close_grads(grads_a, grads_b, rel=1e-10)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mlp_recompute_act_trains_bit_for_bit_and_keeps_no_gelu_output(precision):
    model = GroupViT(cfg(drop_path_rate=0.2)).train()
    lean = twin(model, mlp_recompute_act=True)
    x, t = pixels(4), tokens(4, k=2)
    _, loss_a, grads_a = train_step(model, x, t, seed=3, precision=precision)
    _, loss_b, grads_b = train_step(lean, x, t, seed=3, precision=precision)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a), precision

    def kept_gelu_outputs(m: GroupViT) -> int:
        """GELU outputs of the image tower still alive once the forward is done (kept for backward)."""
        import weakref

        refs = []
        hooks = [mod.act.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))
                 for mod in m.img_encoder.modules() if hasattr(mod, "recompute_act")]
        with autocast(precision):
            out = m(x, t)
        for h in hooks:
            h.remove()
        alive = sum(r() is not None for r in refs)
        del out
        return alive

    assert kept_gelu_outputs(model) > 0 and kept_gelu_outputs(lean) == 0


def test_mlp_recompute_act_leaves_the_mlps_of_checkpointed_blocks_to_the_checkpoint():
    """Nested in a block's checkpoint the Mlp's hooks would keep h, which the checkpoint alone does not keep."""
    model = GroupViT(cfg(mlp_recompute_act=True, grad_checkpointing=True))

    def recomputing(m: GroupViT) -> tuple[int, int]:
        """(MLPs of the transformer blocks, other image-tower MLPs) with recompute_act on."""
        in_blocks = {id(mod) for layer in m.img_encoder.layers for blk in layer.blocks for mod in blk.modules()}
        mlps = [mod for mod in m.img_encoder.modules() if hasattr(mod, "recompute_act")]
        return (sum(mod.recompute_act for mod in mlps if id(mod) in in_blocks),
                sum(mod.recompute_act for mod in mlps if id(mod) not in in_blocks))

    blocks, others = recomputing(model)
    assert blocks == 0 and others > 0  # the grouping blocks' MLPs are not checkpointed: they still recompute
    model.set_grad_checkpointing(False)
    assert recomputing(model)[0] > 0 and recomputing(model)[1] == others
    model.set_mlp_recompute_act(False)
    assert recomputing(model) == (0, 0)


def test_set_attn_impl_and_set_grad_checkpointing_toggle_in_place():
    model = GroupViT(cfg()).eval()
    x, t = pixels(2), tokens(2, k=1)
    ref = model(x, t)
    model.set_attn_impl("eager")
    model.set_grad_checkpointing(True)
    assert all(m.attn_impl == "eager" for m in model.modules() if hasattr(m, "attn_impl"))
    assert_close_dicts({k: v for k, v in model(x, t).items() if v is not None},
                       {k: v for k, v in ref.items() if v is not None}, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attn_impl"):
        model.set_attn_impl("flash")


def test_bf16_autocast_is_close_to_fp32():
    model = GroupViT(cfg()).eval()
    x, t = pixels(4), tokens(4, k=1)
    with torch.no_grad():
        ref = model(x, t)
        with autocast("bf16"):
            low = model(x, t)
    for k in ("image", "text", "prompts"):
        cos = (ref[k] * low[k].float()).sum(-1)
        assert cos.min() > 0.99, k


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """train.compile: the same loss and gradients through the compiled towers. Soft assignment (no Gumbel draws,
    which inductor would draw differently) and one grouping stage, to keep the compile time of the test short."""
    model = GroupViT(cfg(hard_assignment=False, depths=(1, 1), num_heads=(2, 2), num_group_tokens=(8, 0),
                         num_output_groups=(8,), text_layers=1)).train()
    x, t = pixels(4), tokens(4, k=2)
    _, ref_loss, ref_grads = train_step(model, x, t)
    _, loss, grads = train_step(compile_model(twin(model)), x, t)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    # fp32 reassociation: ~1e-5 of the whole gradient. Some biases have gradients ~1e-6 of the whole (those before
    # a shift-invariant softmax), pure cancellation, so each tensor is held to 1e-3 of itself plus 1e-5 of the whole.
    total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    diff = torch.cat([(grads[n] - g).flatten() for n, g in ref_grads.items()]).norm()
    assert diff <= 1e-4 * total, (diff, total)
    for name, g in ref_grads.items():
        assert (grads[name] - g).norm() <= 1e-3 * g.norm() + 1e-5 * total, name


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = GroupViT(cfg()).eval()
    x, t = pixels(2), tokens(2, k=1)
    names = list(model.state_dict())
    with torch.no_grad():
        ref = model(x, t)
        got = compile_model(model)(x, t)
    assert list(model.state_dict()) == names  # compiled in place: checkpoints keep their names
    assert_close_dicts({k: v for k, v in got.items() if v is not None},
                       {k: v for k, v in ref.items() if v is not None}, atol=1e-4, rtol=1e-3)
