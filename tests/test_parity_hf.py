"""Parity with the Hugging Face port (an independent implementation of the reference, numerically equal to it):
a randomly initialised `transformers.GroupViTModel`, saved with `save_pretrained` and loaded with
`groupvit.load_pretrained`, gives the same image and text embeddings, logits, group embeddings and soft assignment
maps in eval mode (fp32, atol 1e-4), at the tiny and the released (gcc_yfcc) sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import groupvit
from groupvit.model.config import ModelConfig

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
CAPTIONS = ["a photo of a cat", "two dogs playing in the snow, at night!", ""]


def hf_config(preset: str) -> "transformers.GroupViTConfig":
    """The HF config of our preset, spelled out (not derived with our own converter)."""
    if preset == "gcc_yfcc":  # the transformers defaults are the released model (nvidia/groupvit-gcc-yfcc)
        return transformers.GroupViTConfig()
    return transformers.GroupViTConfig(
        text_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                         max_position_embeddings=77),
        vision_config=dict(hidden_size=128, intermediate_size=512, depths=[2, 2, 1], num_hidden_layers=5,
                           num_group_tokens=[16, 4, 0], num_output_groups=[16, 4, 4], num_attention_heads=4,
                           image_size=64, patch_size=8),
        projection_dim=128, projection_intermediate_dim=512)


@pytest.fixture(scope="module", params=["tiny", pytest.param("gcc_yfcc", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
    """(HF model, our model loaded from its saved folder, image size), both in eval mode."""
    torch.manual_seed(0)
    hf = transformers.GroupViTModel(hf_config(request.param)).eval()
    with torch.no_grad():
        # Non-trivial BatchNorm statistics and affine parameters, so that carrying them over is tested.
        for bn in (hf.visual_projection[1], hf.text_projection[1]):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1, 0.2)
            bn.bias.normal_(0, 0.2)
        # HF multiplies by exp(logit_scale) without the reference's clamp at 100: stay below it.
        hf.logit_scale.fill_(math.log(30.0))
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf.save_pretrained(folder)  # a local folder (config.json + model.safetensors); no hub access
    ours = groupvit.load_pretrained(folder)
    assert not ours.training
    expected = ModelConfig(preset=request.param)
    for field in ("embed_dim", "depths", "num_heads", "num_group_tokens", "num_output_groups", "text_width",
                  "text_layers", "text_heads", "output_dim", "proj_hidden_dim", "image_size", "patch_size"):
        assert getattr(ours.cfg, field) == getattr(expected, field), field
    return hf, ours, expected.image_size


def test_embeddings_logits_and_soft_maps_match(pair):
    hf, ours, size = pair
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, size, size)
    tokens = groupvit.tokenize(CAPTIONS)  # zero-padded; HF pools at the first EOT, the causal mask hides padding
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=pixels, output_attentions=True)
        image, text = ours.encode_image(pixels), ours.encode_text(tokens)
        seg = ours.segmentation_outputs(pixels)
        hf_image = hf.get_image_features(pixel_values=pixels).pooler_output
        hf_text = hf.get_text_features(input_ids=tokens).pooler_output
        hf_groups = F.normalize(hf.visual_projection(out.vision_model_output.last_hidden_state.flatten(0, 1)), dim=-1)

    torch.testing.assert_close(image, hf_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(text, hf_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds, atol=ATOL, rtol=0)
    scale = ours.logit_scales()[0]
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T  # [B images, N texts]
    torch.testing.assert_close(logits, out.logits_per_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(seg["image"], out.image_embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(seg["groups"].flatten(0, 1), hf_groups, atol=ATOL, rtol=0)

    hf_maps = out.vision_model_output.attentions  # soft assignment of every grouping block, [B, G_i, N_i]
    assert len(seg["soft_maps"]) == len(hf_maps) == 2
    for mine, theirs in zip(seg["soft_maps"], hf_maps, strict=True):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(mine.sum(dim=1), torch.ones_like(mine[:, 0]))  # softmax over groups


def test_batchnorm_statistics_carried(pair):
    hf, ours, _ = pair
    assert torch.equal(ours.img_projector.linear_hidden[1].running_var, hf.visual_projection[1].running_var)
    assert torch.equal(ours.text_projector.linear_hidden[1].running_mean, hf.text_projection[1].running_mean)
