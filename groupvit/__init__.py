"""GroupViT: semantic segmentation emerges from text supervision (CVPR 2022), as a library.

The package is pure: models, losses, data transforms and evaluation; no orchestration (that lives in `pipelines/`).
"""
__version__ = "0.1.0"

# Public entry points, imported on first use so `import groupvit` stays cheap (no vocabulary or model code loaded).
_LAZY = {
    "tokenize": "groupvit.tokenizer",
    "load_pretrained": "groupvit.checkpoint",
    "export_hf": "groupvit.checkpoint",
    "GroupViT": "groupvit.model",
    "ModelConfig": "groupvit.model",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'groupvit' has no attribute {name!r}")
