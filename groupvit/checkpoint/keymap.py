"""Parameter-name maps between our layout (= official NVlabs/GroupViT names) and the Hugging Face GroupViTModel.

Our state dict uses the official names (docs/checkpoint_names.md); the only official difference is the projection
heads: official `Conv1d(k=1)` weights `[out, in, 1]`, ours `Linear` `[out, in]`. The HF port renames almost every
module and splits the fused attention projections into q/k/v:

- vision blocks `attn.qkv` `[3C, C]` <-> `self_attn.{q,k,v}_proj` (row blocks q, k, v);
- text blocks `attn.in_proj_{weight,bias}` `[3W, W]` <-> `self_attn.{q,k,v}_proj.{weight,bias}`;
- heads `linear_hidden.0/.1`, `linear_out` <-> `0`, `1` (BatchNorm), `3` (index 2 is the parameter-free ReLU).

Each rule is a pair of templates, read in both directions; `{i}`, `{j}` are indices, `{rest}` any tail, and an HF
template with `{qkv}` marks a fused tensor split into three. The first matching rule wins, so specific rules come
before the prefix rules.
"""
from __future__ import annotations

import re

import torch

_V = "vision_model.encoder.stages.{i}"
_T = "text_model.encoder.layers.{i}"
# (ours, HF). Placeholders: i, j digits; rest: any non-empty tail; qkv: q|k|v (HF side of a fused tensor only).
RULES: tuple[tuple[str, str], ...] = (
    ("img_encoder.pos_embed", "vision_model.embeddings.position_embeddings"),
    ("img_encoder.patch_embed.proj.{rest}", "vision_model.embeddings.patch_embeddings.projection.{rest}"),
    ("img_encoder.patch_embed.norm.{rest}", "vision_model.embeddings.layernorm.{rest}"),
    ("img_encoder.norm.{rest}", "vision_model.layernorm.{rest}"),
    ("img_encoder.layers.{i}.blocks.{j}.attn.qkv.{rest}", _V + ".layers.{j}.self_attn.{qkv}_proj.{rest}"),
    ("img_encoder.layers.{i}.blocks.{j}.attn.proj.{rest}", _V + ".layers.{j}.self_attn.out_proj.{rest}"),
    ("img_encoder.layers.{i}.blocks.{j}.norm1.{rest}", _V + ".layers.{j}.layer_norm1.{rest}"),
    ("img_encoder.layers.{i}.blocks.{j}.norm2.{rest}", _V + ".layers.{j}.layer_norm2.{rest}"),
    ("img_encoder.layers.{i}.blocks.{j}.mlp.{rest}", _V + ".layers.{j}.mlp.{rest}"),
    ("img_encoder.layers.{i}.downsample.pre_assign_attn.attn.proj.{rest}",
     _V + ".downsample.pre_assign_attn.attn.out_proj.{rest}"),
    # group_token, the rest of the GroupingBlock (same names) and group_projector
    ("img_encoder.layers.{i}.{rest}", _V + ".{rest}"),
    ("text_encoder.token_embedding.{rest}", "text_model.embeddings.token_embedding.{rest}"),
    ("text_encoder.positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("text_encoder.transformer.resblocks.{i}.attn.in_proj_{rest}", _T + ".self_attn.{qkv}_proj.{rest}"),
    ("text_encoder.transformer.resblocks.{i}.attn.out_proj.{rest}", _T + ".self_attn.out_proj.{rest}"),
    ("text_encoder.transformer.resblocks.{i}.ln_1.{rest}", _T + ".layer_norm1.{rest}"),
    ("text_encoder.transformer.resblocks.{i}.ln_2.{rest}", _T + ".layer_norm2.{rest}"),
    ("text_encoder.transformer.resblocks.{i}.mlp.c_fc.{rest}", _T + ".mlp.fc1.{rest}"),
    ("text_encoder.transformer.resblocks.{i}.mlp.c_proj.{rest}", _T + ".mlp.fc2.{rest}"),
    ("text_encoder.ln_final.{rest}", "text_model.final_layer_norm.{rest}"),
    ("img_projector.linear_out.{rest}", "visual_projection.3.{rest}"),  # before linear_hidden.{i}: HF index 3
    ("img_projector.linear_hidden.{i}.{rest}", "visual_projection.{i}.{rest}"),
    ("text_projector.linear_out.{rest}", "text_projection.3.{rest}"),
    ("text_projector.linear_hidden.{i}.{rest}", "text_projection.{i}.{rest}"),
    ("logit_scale", "logit_scale"),
)
QKV = ("q", "k", "v")
# Ours only: HF has no multi-label scale (the exporter keeps it in config.json, see checkpoint/hf_config.py).
OURS_ONLY = ("multi_label_logit_scale",)
# HF only: a non-persistent buffer that older transformers versions saved; it carries no weights.
HF_LEFTOVERS = ("text_model.embeddings.position_ids",)
# Projection-head weights: official Conv1d(k=1) [out, in, 1] <-> our Linear [out, in].
_HEAD_WEIGHT = re.compile(r"^(img|text)_projector\.(linear_hidden\.\d+|linear_out)\.weight$")

_PLACEHOLDER = {"i": r"\d+", "j": r"\d+", "rest": r".+", "qkv": "[qkv]"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    body = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_PLACEHOLDER[p]})" for n, p in enumerate(parts))
    return re.compile(f"^{body}$")


_COMPILED = [(_compile(ours), ours, _compile(hf), hf) for ours, hf in RULES]


def hf_names(key: str) -> list[str]:
    """HF name(s) of one of our tensors: one name, three (q, k, v) for a fused projection, none for OURS_ONLY.

    Raises:
        KeyError: the name matches no rule (not a GroupViT tensor).
    """
    if key in OURS_ONLY:
        return []
    for ours_re, _, _, hf in _COMPILED:
        m = ours_re.match(key)
        if m:
            fields = m.groupdict()
            if "{qkv}" in hf:
                return [hf.format(qkv=x, **fields) for x in QKV]
            return [hf.format(**fields)]
    raise KeyError(key)


def our_name(hf_key: str) -> tuple[str, int | None]:
    """Our name of one HF tensor and, for a part of a fused projection, its row block (0 q, 1 k, 2 v).

    Raises:
        KeyError: the name matches no rule.
    """
    for _, ours, hf_re, _ in _COMPILED:
        m = hf_re.match(hf_key)
        if m:
            fields = m.groupdict()
            part = QKV.index(fields.pop("qkv")) if "qkv" in fields else None
            return ours.format(**fields), part
    raise KeyError(hf_key)


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF GroupViTModel names; fused projections split into three row blocks (copies).

    OURS_ONLY tensors are left out (the caller stores them elsewhere). Unknown names raise KeyError.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = hf_names(key)
        if len(names) == 3:
            for name, chunk in zip(names, tensor.chunk(3, dim=0), strict=True):  # [3C, ...] -> 3 x [C, ...]
                out[name] = chunk.clone()
        elif names:
            out[names[0]] = tensor
    return out


def hf_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """HF state dict -> our names, concatenating q/k/v row blocks into fused projections.

    Returns:
        (state, unexpected HF names that match no rule, missing HF names of incomplete q/k/v triples).
        HF_LEFTOVERS are dropped silently.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if key in HF_LEFTOVERS:
            continue
        try:
            name, part = our_name(key)
        except KeyError:
            unexpected.append(key)
            continue
        if part is None:
            out[name] = tensor
        else:
            parts.setdefault(name, {})[part] = tensor
    missing: list[str] = []
    for name, blocks in parts.items():
        if len(blocks) == 3:
            out[name] = torch.cat([blocks[0], blocks[1], blocks[2]], dim=0)  # q, k, v row blocks
        else:
            missing += [n for p, n in enumerate(hf_names(name)) if p not in blocks]
    return out, unexpected, missing


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> ours: drop DDP `module.` / torch.compile `_orig_mod.` prefixes, squeeze the Conv1d
    head weights to Linear."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v.squeeze(-1) if _HEAD_WEIGHT.match(k) and v.ndim == 3 and v.shape[-1] == 1 else v
            for k, v in state.items()}


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official layout: Linear head weights become Conv1d(k=1) weights [out, in, 1]."""
    return {k: v.unsqueeze(-1) if _HEAD_WEIGHT.match(k) and v.ndim == 2 else v for k, v in state.items()}

