"""The `groupvit` console script: `groupvit <command> [--params FILE] [--set section.key=value ...] ...`.

Each command is a module in `pipelines.stages` (or `pipelines`) with `main(argv) -> int`; the DVC `cmd`, the Prefect
task and the tests call the same function.
"""
from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Modules are imported lazily so `groupvit --help` is instant.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.stages.synth", "generate the embedded synthetic captioned-scene world"),
    "download": ("pipelines.stages.download", "url list -> webdataset shards with img2dataset"),
    "nouns": ("pipelines.stages.nouns", "spaCy candidate words per sample, one sidecar per shard"),
    "train": ("pipelines.stages.train", "train GroupViT (torchrun/DDP when more than one process)"),
    "evaluate": ("pipelines.stages.evaluate", "zero-shot semantic segmentation and classification"),
    "segment": ("pipelines.stages.segment", "segment one image with any class list, write the overlay"),
    "demo": ("pipelines.stages.demo", "serve the interactive segmentation web page (Gradio)"),
    "convert": ("pipelines.stages.convert", "convert checkpoints between official, HF and project layouts"),
    "ablate": ("pipelines.stages.ablate", "run an ablation grid as MLflow child runs"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: groupvit <command> [--params FILE] [--set section.key=value ...] [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"groupvit: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
