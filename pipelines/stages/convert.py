"""`groupvit convert SRC DST [--to official|hf|groupvit] [--preset NAME | --config FILE]`: convert GroupViT weights.

Not a DVC stage (a command-line utility; no params section, no metrics). Examples:

    groupvit convert group_vit_gcc_yfcc_30e-879422e0.pth data/released          # official -> our folder
    groupvit convert data/released out/groupvit-hf --to hf                       # ours -> transformers folder
    groupvit convert out/groupvit-hf released.pth                                # HF -> official .pth

SRC: official `.pth` (`{"model": ...}`), HF GroupViTModel folder or state dict (`.safetensors`/`.bin`), or our
folder. DST layout: `--to`, else `.pth`/`.pt` -> official and anything else -> groupvit (our folder). Tensors pass
strict key accounting (a missing, unexpected or mis-shaped tensor is an error that names it) and are written
atomically: a failed conversion leaves DST as it was. The HF model always assigns hard and adds the group tokens
back at scale 1, so models trained with `hard_assignment: false` or `group_residual` != 1 (the synthetic default)
stay in our or the official layout (a clear error otherwise). Details: docs/checkpoints.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from groupvit.checkpoint import LAYOUTS, convert, default_layout
from groupvit.checkpoint.configs import config_from_dict
from groupvit.errors import ConfigError
from groupvit.model.config import PRESETS, ModelConfig
from pipelines.common import run_stage


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="groupvit convert",
                                description="Convert GroupViT weights between the official, Hugging Face and "
                                            "this project's layouts (docs/checkpoints.md).")
    p.add_argument("src", help="input checkpoint: official .pth, HF folder/state dict, or our folder")
    p.add_argument("dst", help="output: .pth (official) or a folder (hf, groupvit)")
    p.add_argument("--to", choices=LAYOUTS, help="output layout (default: official for .pth/.pt, else groupvit)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--preset", choices=sorted(PRESETS),
                      help="architecture preset, for a source without config whose attention heads differ "
                           "from width/64")
    arch.add_argument("--config", type=Path, help="ModelConfig JSON (e.g. another model's config.json)")
    return p.parse_args(argv)


def architecture(args: argparse.Namespace) -> ModelConfig | None:
    """The ModelConfig given on the command line, or None (then read or inferred from SRC)."""
    if args.preset:
        return ModelConfig(preset=args.preset)
    if args.config:
        try:
            data = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--config {args.config}: unreadable JSON ({e})") from e
        return config_from_dict(data, str(args.config))
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        layout = convert(args.src, args.dst, to=args.to or default_layout(args.dst), config=architecture(args))
        print(f"wrote {args.dst} ({layout} layout)")
        return 0

    return run_stage(body)
