"""Load released GroupViT weights (official NVlabs `.pth`, Hugging Face GroupViTModel) and convert between layouts.

    model = groupvit.load_pretrained("group_vit_gcc_yfcc_30e-879422e0.pth")   # or an HF folder, or data/model
    groupvit.export_hf(model, "out/groupvit-hf")                               # loadable by transformers
    groupvit convert SRC DST [--to official|hf|groupvit]                       # the same on the command line

Key accounting is strict: a missing, unexpected or differently shaped tensor is a DataError naming it (with both
shapes). The documented exceptions (docs/checkpoints.md): HF `text_model.embeddings.position_ids` is ignored;
`multi_label_logit_scale` may be absent (the RedCaps release) or present for a model configured without it;
a differently sized `img_encoder.pos_embed` is bicubically resized (as the reference does), with a warning.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from groupvit.checkpoint import keymap
from groupvit.checkpoint.configs import (
    MULTI_LABEL_KEY,
    config_from_dict,
    config_from_hf,
    config_from_reference,
    config_to_dict,
    config_to_hf,
    infer_config,
)
from groupvit.checkpoint.io import (
    LAYOUTS,
    CheckpointError,
    RawCheckpoint,
    read_checkpoint,
    read_training_config,
    save_official,
    save_safetensors_folder,
)
from groupvit.errors import ConfigError, DataError
from groupvit.model.config import ModelConfig
from groupvit.model.vision import resize_pos_embed

log = logging.getLogger(__name__)
ML_SCALE = "multi_label_logit_scale"
POS_EMBED = "img_encoder.pos_embed"
__all__ = ["LAYOUTS", "CheckpointError", "convert", "export_hf", "export_official", "load_pretrained", "read_weights",
           "save_pretrained", "weights_digest"]


@functools.lru_cache(maxsize=8)
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of `GroupViT(cfg)` (built on the meta device when the model allows it: no
    memory, no init cost)."""
    from groupvit.model.groupvit import GroupViT

    try:
        with torch.device("meta"):
            model = GroupViT(cfg)
    except (NotImplementedError, RuntimeError):  # construction reads tensor values (e.g. a drop-path schedule)
        model = GroupViT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _grid_ok(found: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Both positional embeddings are [1, h*w, C] square grids of the same width: resizable."""
    return (len(found) == len(want) == 3 and found[0] == want[0] == 1 and found[2] == want[2]
            and math.isqrt(found[1]) ** 2 == found[1])


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, raw: RawCheckpoint,
                missing_hf: list[str] | None = None, unexpected_hf: list[str] | None = None,
                expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Strict key accounting of a state dict (our names) against `GroupViT(cfg)`; returns the state to load.

    Args:
        state: tensors in our names.
        cfg: the architecture.
        raw: the checkpoint as read (layout and source for messages).
        missing_hf, unexpected_hf: HF names already found missing/unexpected while renaming.
        expected: name -> shape of the model (default: from `cfg`).

    Raises:
        DataError: names the missing, unexpected and mis-shaped tensors (first ones first, with both shapes).
    """
    expected = expected if expected is not None else expected_shapes(cfg)
    state = dict(state)
    if ML_SCALE in expected and ML_SCALE not in state:
        log.warning("%s: no %s (a model trained without multi-label loss); it keeps its initial value",
                    raw.source, ML_SCALE)
    if ML_SCALE in state and ML_SCALE not in expected:
        log.warning("%s: %s dropped, the configured model has multi_label=false", raw.source, ML_SCALE)
        del state[ML_SCALE]
    hf = raw.layout == "hf"
    # In the file's own names; for HF, only the parts of a q/k/v triple that are really absent.
    absent = [n for k in expected if k not in state and k != ML_SCALE for n in (keymap.hf_names(k) if hf else [k])
              if not (hf and n in raw.state)]
    missing = list(dict.fromkeys([*(missing_hf or []), *absent]))
    unexpected = list(unexpected_hf or []) + [
        ", ".join(keymap.hf_names(k)) if hf else k for k in state if k not in expected]
    mis_shaped = []
    for k, v in list(state.items()):
        if k in expected and tuple(v.shape) != expected[k]:
            if k == POS_EMBED and _grid_ok(tuple(v.shape), expected[k]):
                log.warning("%s: %s has %d positions, the model %d: resized bicubically (as the reference)",
                            raw.source, k, v.shape[1], expected[k][1])
                state[k] = resize_pos_embed(v, (math.isqrt(v.shape[1]),) * 2, cfg.grid)
                continue
            name = f"{k} (= {' + '.join(keymap.hf_names(k))})" if hf else k
            mis_shaped.append(f"{name}: checkpoint {list(v.shape)} vs model {list(expected[k])}")
    if missing or unexpected or mis_shaped:
        lines = [f"{raw.source}: the {raw.layout} checkpoint does not match the model "
                 f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped tensors)"]
        for title, items in (("mis-shaped", mis_shaped), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                lines.append(f"  {title}: " + "; ".join(items[:10]) + more)
        raise DataError("\n".join(lines))
    return state


def _to_ours(raw: RawCheckpoint) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """State dict in our names, plus HF names that were left over or incomplete."""
    if raw.layout == "hf":
        state, unexpected, missing = keymap.hf_to_ours(raw.state)
        if raw.meta and MULTI_LABEL_KEY in raw.meta:
            state[ML_SCALE] = torch.tensor(float(raw.meta[MULTI_LABEL_KEY]))
        return state, unexpected, missing
    return keymap.official_to_ours(raw.state), [], []


def _config(raw: RawCheckpoint, state: dict[str, torch.Tensor], config: ModelConfig | None) -> ModelConfig:
    """The architecture: `config`, else the file's own config (ours, HF's, or the reference's training config),
    else the tensor shapes (heads assumed width / 64, with a warning)."""
    if config is not None:
        return config
    if raw.meta is not None:
        reader = config_from_hf if raw.layout == "hf" else config_from_dict
        try:
            return reader(raw.meta, raw.source)
        except ConfigError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # a config.json of the wrong shape
            raise ConfigError(f"{raw.source}: config does not describe a GroupViT ({type(e).__name__}: {e})") from e
    if raw.training_config:
        return config_from_reference(read_training_config(raw.source), f"{raw.source} ['config']")
    cfg = infer_config(state, raw.source)
    log.warning("%s: no config in the file, architecture inferred from the tensor shapes; attention heads are not in "
                "the shapes and are assumed width / 64 (vision %s, text %d): pass config= (groupvit convert "
                "--config/--preset) if the model was trained with others", raw.source, list(cfg.num_heads),
                cfg.text_heads)
    return cfg


def read_weights(path: str | Path, config: ModelConfig | None = None
                 ) -> tuple[dict[str, torch.Tensor], ModelConfig, RawCheckpoint]:
    """Read any supported checkpoint as (state dict in our names, its ModelConfig, the raw checkpoint), checked.

    Args:
        path: official `.pth`, HF folder or state dict (safetensors/.bin), or our folder.
        config: the architecture; default: from the checkpoint's config, else inferred from the shapes.
    """
    raw = read_checkpoint(path)
    state, unexpected, missing = _to_ours(raw)
    cfg = _config(raw, state, config)
    return check_state(state, cfg, raw, missing, unexpected), cfg, raw


def load_pretrained(path: str | Path, config: ModelConfig | None = None):
    """Build a `GroupViT` from released or converted weights, in eval mode.

    Args:
        path: official NVlabs checkpoint (`.pth` with a `model` key), Hugging Face GroupViTModel folder or state
            dict (safetensors or `.bin`), or a folder written by this project (`model.safetensors` + `config.json`).
        config: the architecture; default: from the checkpoint's config (for an official `.pth`: the reference's
            training config it embeds, read without unpickling objects), else inferred from the tensor shapes.

    Returns:
        The model (`encode_image`, `encode_text`, `segmentation_outputs`), BatchNorm running statistics included.

    Raises:
        DataError: a tensor is missing, unexpected or mis-shaped (named), or the file is not a GroupViT checkpoint.
        CheckpointError: (a DataError) a file is truncated or corrupt, or an official `.pth` pickles objects that
            are not weights or plain config data (named, never loaded).
        ConfigError: the config in the checkpoint (our `config.json`, HF's, or the reference's training config in
            an official `.pth`) is malformed or describes a model this project does not compute.
    """
    from groupvit.model.groupvit import GroupViT

    raw = read_checkpoint(path)
    state, unexpected, missing = _to_ours(raw)
    cfg = _config(raw, state, config)
    model = GroupViT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = check_state(state, cfg, raw, missing, unexpected, expected=shapes)
    if ML_SCALE not in state and model.multi_label_logit_scale is not None:
        state[ML_SCALE] = model.multi_label_logit_scale.detach().clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes): identifies the weights whatever file held them.

    The evaluate stage records it beside the threshold it tuned, so `groupvit segment` uses a threshold only for
    the weights it was tuned for.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _state_and_config(source: Any, config: ModelConfig | None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state, config) of a GroupViT module or of any checkpoint path."""
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}, config or source.cfg
    state, cfg, _ = read_weights(source, config)
    return state, cfg


def _write(layout: str, state: dict[str, torch.Tensor], cfg: ModelConfig, dst: str | Path,
           extra: Callable[[Path], None] | None = None) -> None:
    if layout == "official":
        save_official(dst, keymap.ours_to_official(state), config_to_dict(cfg))
    elif layout == "hf":
        hf_config = config_to_hf(cfg, float(state[ML_SCALE]) if ML_SCALE in state else None)
        save_safetensors_folder(dst, keymap.ours_to_hf(state), hf_config, sort_keys=True, extra=extra)
    else:
        save_safetensors_folder(dst, state, config_to_dict(cfg), extra=extra)


def save_pretrained(model: Any, directory: str | Path, config: ModelConfig | None = None,
                    extra: Callable[[Path], None] | None = None) -> None:
    """Write our layout: `directory/model.safetensors` + `directory/config.json` (the ModelConfig), atomically.

    This is what `groupvit train` publishes as `data/model` and `groupvit convert --to groupvit` writes.

    Args:
        model: a GroupViT module or any checkpoint path.
        directory: the output folder (replaced if it exists; a failed write leaves it untouched).
        config: the architecture when `model` is a path whose config cannot be read or inferred.
        extra: `extra(tmp)` adds files to the new folder before it replaces `directory` (e.g. the run's
            `resolved_config.yaml`).
    """
    _write("groupvit", *_state_and_config(model, config), directory, extra)


def export_hf(model: Any, directory: str | Path, config: ModelConfig | None = None) -> None:
    """Write a transformers GroupViTModel folder (`config.json` + `model.safetensors`), atomically.

    Args:
        model: a GroupViT module or any checkpoint path.
        directory: the output folder (replaced if it exists).
        config: the architecture when `model` is a path whose config cannot be read or inferred.

    The multi-label logit scale, which the HF model lacks, is kept in config.json (`groupvit_multi_label_logit_scale`)
    so that converting back restores it; transformers ignores the extra key.
    """
    _write("hf", *_state_and_config(model, config), directory)


def export_official(model: Any, path: str | Path, config: ModelConfig | None = None) -> None:
    """Write the reference layout: a `.pth` with `{"model": state_dict}` (Conv1d heads) and our config, atomically.

    The reference code reads only the weights: switches it does not have (`group_residual`, `multi_label_match`,
    soft assignment in its own yaml) live in our config inside the file, which `load_pretrained` restores.

    Args:
        model: a GroupViT module or any checkpoint path.
        path: the output `.pth` file (replaced if it exists).
        config: the architecture when `model` is a path whose config cannot be read or inferred.
    """
    _write("official", *_state_and_config(model, config), path)


def default_layout(dst: str | Path) -> str:
    """Layout implied by an output path: `.pth`/`.pt` -> official, anything else (a folder) -> groupvit."""
    return "official" if Path(dst).suffix in (".pth", ".pt") else "groupvit"


def convert(src: str | Path, dst: str | Path, to: str | None = None, config: ModelConfig | None = None) -> str:
    """Convert a checkpoint between layouts (after strict key accounting); returns the layout written.

    Args:
        src: any supported checkpoint.
        dst: output `.pth` (official) or folder (hf, groupvit).
        to: `official`, `hf` or `groupvit`; default from `dst` (see `default_layout`).
        config: the architecture when the source has no config and the shapes do not tell (attention heads).
    """
    to = to or default_layout(dst)
    if to not in LAYOUTS:
        raise DataError(f"unknown checkpoint layout {to!r}; expected one of {list(LAYOUTS)}")
    if Path(src).resolve() == Path(dst).resolve():
        raise DataError(f"{dst}: the output must differ from the input")
    state, cfg, _ = read_weights(src, config)
    _write(to, state, cfg, dst)
    return to
