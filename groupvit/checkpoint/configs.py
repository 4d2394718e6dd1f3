"""`ModelConfig` from a Hugging Face `config.json`, to one, from the reference's training config embedded in an
official `.pth`, and from the tensor shapes of an official checkpoint without a config.

From the shapes alone, what they cannot tell (attention heads, training-only settings such as drop-path or the
Gumbel temperature) comes from the `gcc_yfcc` preset, with heads = width / 64 as the reference's text tower computes
them (and as the released vision config, 384 / 6 heads, satisfies). Pass `config=` to `load_pretrained` to override.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from groupvit.config import build
from groupvit.errors import ConfigError, DataError
from groupvit.model.config import ModelConfig

# HF defaults (transformers GroupViT{Text,Vision}Config), used when a config.json leaves a field out.
HF_TEXT_DEFAULTS: dict[str, Any] = dict(vocab_size=49408, hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=12, num_attention_heads=4, max_position_embeddings=77,
                                        hidden_act="quick_gelu")
HF_VISION_DEFAULTS: dict[str, Any] = dict(hidden_size=384, intermediate_size=1536, depths=[6, 3, 3],
                                          num_group_tokens=[64, 8, 0], num_output_groups=[64, 8, 8],
                                          num_attention_heads=6, image_size=224, patch_size=16, hidden_act="gelu",
                                          assign_eps=1.0, assign_mlp_ratio=[0.5, 4])
# Where the exporter keeps our multi-label logit scale (the HF model has none; transformers keeps unknown config
# keys as plain attributes, so the file still loads there).
MULTI_LABEL_KEY = "groupvit_multi_label_logit_scale"


def config_from_dict(data: Mapping[str, Any], source: str) -> ModelConfig:
    """A `ModelConfig` from its dict (our `config.json`); unknown keys and bad values are a ConfigError."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown ModelConfig keys {unknown}; expected a subset of {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid model config: {e}") from e


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of a `ModelConfig` (tuples become lists); `config_from_dict` inverts it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_hf(data: Mapping[str, Any], source: str) -> ModelConfig:
    """A `ModelConfig` from a transformers `GroupViTConfig` dict (`config.json` of a GroupViTModel)."""
    if data.get("model_type", "groupvit") != "groupvit":
        raise ConfigError(f"{source}: model_type {data.get('model_type')!r} is not 'groupvit'")
    # Configs written by 2022 transformers versions may also carry the sub-configs as `*_config_dict`.
    text = {**HF_TEXT_DEFAULTS, **(data.get("text_config") or data.get("text_config_dict") or {})}
    vision = {**HF_VISION_DEFAULTS, **(data.get("vision_config") or data.get("vision_config_dict") or {})}
    width, dim = text["hidden_size"], vision["hidden_size"]
    depths = list(vision["depths"])
    groups, outputs = list(vision["num_group_tokens"]), list(vision["num_output_groups"])[:len(depths) - 1]
    checks = {
        "text_config.hidden_act": (text["hidden_act"], "quick_gelu"),
        "vision_config.hidden_act": (vision["hidden_act"], "gelu"),
        "text_config.intermediate_size": (text["intermediate_size"], 4 * width),
        "vision_config.assign_mlp_ratio": (list(vision["assign_mlp_ratio"]), [0.5, 4]),
    }
    for key, (found, wanted) in checks.items():
        if found != wanted:
            raise ConfigError(f"{source}: {key} = {found!r}; the GroupViT model supports {wanted!r} only")
    for i in range(1, len(depths)):
        # HF sizes group_projector from num_output_groups[i-1], the reference from num_group_tokens[i-1].
        if groups[i] > 0 and outputs[i - 1] != groups[i - 1]:
            raise ConfigError(f"{source}: vision_config.num_output_groups[{i - 1}] = {outputs[i - 1]} differs from "
                              f"num_group_tokens[{i - 1}] = {groups[i - 1]}; the reference model cannot express it")
    return ModelConfig(
        preset="gcc_yfcc", image_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=dim,
        depths=tuple(depths), num_heads=(vision["num_attention_heads"],) * len(depths),
        num_group_tokens=tuple(groups), num_output_groups=tuple(outputs),
        mlp_ratio=vision["intermediate_size"] / dim, assign_eps=float(vision["assign_eps"]),
        text_width=width, text_layers=text["num_hidden_layers"], text_heads=text["num_attention_heads"],
        context_length=text["max_position_embeddings"], vocab_size=text["vocab_size"],
        output_dim=data.get("projection_dim", 256), proj_hidden_dim=data.get("projection_intermediate_dim", 4096),
        contrast_temperature=math.exp(-data.get("logit_scale_init_value", 2.6592)),
        multi_label=MULTI_LABEL_KEY in data,
    )


# The reference's constructor defaults for keys its yaml leaves out (NVlabs/GroupViT `models/group_vit.py` GroupViT,
# `models/transformer.py` TextTransformer, `models/multi_label_contrastive.py` MultiLabelContrastive). A key outside
# these is not an argument of the reference (its constructor would have failed), so the config is refused.
REF_VISION_DEFAULTS: dict[str, Any] = dict(
    type="GroupViT", img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=384, embed_factors=None,
    depths=[6, 3, 3], num_heads=[6, 6, 6], num_group_tokens=[64, 8, 0], num_output_groups=[64, 8],
    hard_assignment=True, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
    drop_path_rate=0.1, patch_norm=True, use_checkpoint=False, pos_embed_type="simple", freeze_patch_embed=False)
REF_TEXT_DEFAULTS: dict[str, Any] = dict(type="TextTransformer", context_length=None, width=None, layers=None,
                                         vocab_size=None, use_checkpoint=False)  # None: required
REF_MODEL_DEFAULTS: dict[str, Any] = dict(type="MultiLabelContrastive", img_encoder=None, text_encoder=None,
                                          output_dim=256, contrast_temperature=0.07, proj_num_layers=2, multi_label=0,
                                          share_temperature=False, multi_label_loss_weight=1.0)
# Reference settings this model computes at one value only (a qkv bias, no class head, LayerNorm after the patch
# embedding, learned position embeddings, one width for every stage, Linear-BN-ReLU-Linear projection heads).
REF_FIXED: dict[str, Any] = {"img_encoder.type": "GroupViT", "img_encoder.in_chans": 3, "img_encoder.num_classes": 0,
                             "img_encoder.qkv_bias": True, "img_encoder.qk_scale": None, "img_encoder.patch_norm": True,
                             "img_encoder.pos_embed_type": "simple", "text_encoder.type": "TextTransformer",
                             "type": "MultiLabelContrastive", "proj_num_layers": 2}
REF_PROJ_HIDDEN = 4096  # ProjectMLP's inner_dim, which MultiLabelContrastive never sets
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def _resolve(value: Any, root: Mapping[str, Any], key: str, source: str, depth: int = 0) -> Any:
    """`value` with an OmegaConf interpolation of another key (`${data.text_aug.multi_label}`) followed."""
    if not isinstance(value, str) or "${" not in value and value != "???":
        return value
    match = _INTERPOLATION.fullmatch(value)
    if value == "???" or match is None or depth > 8:
        raise ConfigError(f"{source}: model.{key} = {value!r} cannot be resolved (a missing value, a resolver or "
                          f"an interpolation inside text); pass config= (groupvit convert --config/--preset)")
    target: Any = root
    for part in match.group(1).split("."):
        if not isinstance(target, Mapping) or part not in target:
            raise ConfigError(f"{source}: model.{key} = {value!r} points to no key of the config")
        target = target[part]
    return _resolve(target, root, key, source, depth + 1)


def _reference_section(data: Mapping[str, Any], name: str, defaults: Mapping[str, Any], root: Mapping[str, Any],
                       source: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """One section of the reference's `model` config with its defaults filled in and interpolations resolved."""
    section = data.get(name) if name else data
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: model.{name} is {section!r}, expected a mapping (the reference's model config)")
    prefix = f"{name}." if name else ""
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ConfigError(f"{source}: model.{prefix}{unknown[0]} is not an argument of the reference model "
                          f"(known: {', '.join(sorted(defaults))}); pass config= (groupvit convert --config)")
    for key in required:
        if section.get(key) is None:
            raise ConfigError(f"{source}: model.{prefix}{key} missing (the reference requires it)")
    return {k: _resolve(section.get(k, v), root, prefix + k, source) for k, v in defaults.items()}


def config_from_reference(data: Mapping[str, Any], source: str) -> ModelConfig:
    """A `ModelConfig` from the reference's training config (the `config` an NVlabs/GroupViT `.pth` embeds, as
    plain dicts: `read_training_config`), as the reference would build its model from it.

    Read: `model.img_encoder` (img_size, patch_size, embed_dim, depths, num_heads, num_group_tokens,
    num_output_groups, hard_assignment, mlp_ratio, drop_path_rate), `model.text_encoder` (context_length, width,
    layers, vocab_size; heads = width // 64 as the reference computes them), `model.output_dim`,
    `model.contrast_temperature`, and `model.multi_label` > 0 without `share_temperature` (its own scale). Keys left
    out take the reference's constructor defaults.

    Raises:
        ConfigError: no `model` section, a key the reference does not have, an interpolation that cannot be
            followed, or a setting this model does not compute (names the key and the supported value).
    """
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError(f"{source}: no `model` section (found keys {sorted(map(str, data))[:8]}); not the "
                          "reference's training config, pass config= (groupvit convert --config/--preset)")
    top = _reference_section(model, "", REF_MODEL_DEFAULTS, data, source)
    vision = _reference_section(model, "img_encoder", REF_VISION_DEFAULTS, data, source)
    text = _reference_section(model, "text_encoder", REF_TEXT_DEFAULTS, data, source,
                              required=("context_length", "width", "layers", "vocab_size"))
    found = {**{f"img_encoder.{k}": v for k, v in vision.items()}, **{f"text_encoder.{k}": v for k, v in text.items()},
             **top}
    for key, wanted in REF_FIXED.items():
        if found[key] != wanted:
            raise ConfigError(f"{source}: model.{key} = {found[key]!r}; this GroupViT computes {wanted!r} only")
    depths = vision["depths"]
    if vision["embed_factors"] is not None and list(vision["embed_factors"]) != [1] * len(depths):
        raise ConfigError(f"{source}: model.img_encoder.embed_factors = {vision['embed_factors']!r}; this GroupViT "
                          "has one width for every stage (all 1)")
    size = vision["img_size"]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    width = text["width"]
    if not isinstance(width, int) or width < 64:
        raise ConfigError(f"{source}: model.text_encoder.width = {width!r}; the reference's text tower has "
                          "width // 64 heads, so it needs an int >= 64")
    multi_label = top["multi_label"]
    if not isinstance(multi_label, (int, float)):
        raise ConfigError(f"{source}: model.multi_label = {multi_label!r}, expected a number of prompts")
    values = dict(
        preset="gcc_yfcc", image_size=size, patch_size=vision["patch_size"], embed_dim=vision["embed_dim"],
        depths=depths, num_heads=vision["num_heads"], num_group_tokens=vision["num_group_tokens"],
        num_output_groups=vision["num_output_groups"], hard_assignment=vision["hard_assignment"],
        mlp_ratio=vision["mlp_ratio"], drop_path_rate=vision["drop_path_rate"], text_width=width,
        text_layers=text["layers"], text_heads=width // 64, context_length=text["context_length"],
        vocab_size=text["vocab_size"], output_dim=top["output_dim"], proj_hidden_dim=REF_PROJ_HIDDEN,
        contrast_temperature=top["contrast_temperature"],
        multi_label=multi_label > 0 and not top["share_temperature"])
    return build(ModelConfig, values, f"{source} (as ModelConfig)")


def config_to_hf(cfg: ModelConfig, multi_label_logit_scale: float | None = None) -> dict[str, Any]:
    """A transformers `GroupViTConfig` dict for `cfg` (loadable with `GroupViTModel.from_pretrained`).

    Raises:
        ConfigError: the architecture has no HF equivalent (per-stage head counts, a plain ViT without grouping, soft
            assignment or a scaled group residual: the HF port always assigns hard and adds the groups back at 1).
    """
    if not cfg.hard_assignment:
        raise ConfigError("model.hard_assignment = false: the HF port always assigns hard (argmax in eval), so the "
                          "exported model would segment differently; keep this checkpoint in our or the official "
                          "layout")
    if cfg.group_residual != 1.0:
        raise ConfigError(f"model.group_residual = {cfg.group_residual}: the HF port always adds the group tokens back "
                          "at scale 1, so the exported model would compute something else; keep this checkpoint in "
                          "our or the official layout")
    if len(set(cfg.num_heads)) != 1:
        raise ConfigError(f"model.num_heads {list(cfg.num_heads)}: the HF port has one head count for all stages")
    if not cfg.has_grouping:
        raise ConfigError("the HF port has no plain-ViT (no grouping) variant")
    dim, width = cfg.embed_dim, cfg.text_width
    vision = dict(HF_VISION_DEFAULTS, hidden_size=dim, intermediate_size=int(round(cfg.mlp_ratio * dim)),
                  depths=list(cfg.depths), num_hidden_layers=sum(cfg.depths),
                  num_group_tokens=list(cfg.num_group_tokens),
                  # HF wants one entry per stage; the last is unused, we repeat the final group count.
                  num_output_groups=[*cfg.num_output_groups, cfg.num_output_groups[-1]],
                  num_attention_heads=cfg.num_heads[0], image_size=cfg.image_size, patch_size=cfg.patch_size,
                  assign_eps=cfg.assign_eps, layer_norm_eps=1e-5, model_type="groupvit_vision_model")
    text = dict(HF_TEXT_DEFAULTS, vocab_size=cfg.vocab_size, hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                max_position_embeddings=cfg.context_length, layer_norm_eps=1e-5, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1, model_type="groupvit_text_model")
    out: dict[str, Any] = dict(architectures=["GroupViTModel"], model_type="groupvit", text_config=text,
                               vision_config=vision, projection_dim=cfg.output_dim,
                               projection_intermediate_dim=cfg.proj_hidden_dim,
                               logit_scale_init_value=math.log(1.0 / cfg.contrast_temperature),
                               output_segmentation=False, torch_dtype="float32")
    if multi_label_logit_scale is not None:
        out[MULTI_LABEL_KEY] = float(multi_label_logit_scale)
    return out


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_config(state: Mapping[str, torch.Tensor], source: str) -> ModelConfig:
    """A `ModelConfig` from the shapes of a state dict in our (= official) names.

    Raises:
        DataError: a tensor every GroupViT has is missing (names it).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise DataError(f"{source}: cannot infer the architecture, tensor {key!r} is missing "
                            f"(not a GroupViT checkpoint?)")
        return tuple(state[key].shape)

    _, num_patches, dim = shape("img_encoder.pos_embed")
    patch = shape("img_encoder.patch_embed.proj.weight")[-1]
    num_stages = _count(state, r"^img_encoder\.layers\.(\d+)\.")
    if num_stages == 0:
        raise DataError(f"{source}: cannot infer the architecture, no 'img_encoder.layers.*' tensors")
    depths = tuple(_count(state, rf"^img_encoder\.layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages))
    groups = tuple(state[f"img_encoder.layers.{i}.group_token"].shape[1]
                   if f"img_encoder.layers.{i}.group_token" in state else 0 for i in range(num_stages))
    outputs = tuple(shape(f"img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight")[0]
                    for i in range(num_stages - 1))
    vocab, width = shape("text_encoder.token_embedding.weight")
    hidden, _ = shape("img_projector.linear_hidden.0.weight")[:2]
    return ModelConfig(
        preset="gcc_yfcc", image_size=math.isqrt(num_patches) * patch, patch_size=patch, embed_dim=dim,
        depths=depths, num_heads=(max(dim // 64, 1),) * num_stages, num_group_tokens=groups,
        num_output_groups=outputs, mlp_ratio=shape("img_encoder.layers.0.blocks.0.mlp.fc1.weight")[0] / dim,
        text_width=width, text_heads=max(width // 64, 1),
        text_layers=_count(state, r"^text_encoder\.transformer\.resblocks\.(\d+)\."),
        context_length=shape("text_encoder.positional_embedding")[0], vocab_size=vocab,
        output_dim=shape("img_projector.linear_out.weight")[0], proj_hidden_dim=hidden,
        multi_label="multi_label_logit_scale" in state,
    )
