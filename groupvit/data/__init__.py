"""Caption data: url lists -> img2dataset shards (`download`), spaCy noun sidecars (`nouns`), prompted multi-label
texts (`prompts`), augmentation without torchvision (`augment`) and the webdataset training loader (`loader`);
the params sections `download`, `nouns` and `data` in `config`.

`from groupvit.data import DataConfig, make_train_loader` works; submodules are imported on first use so that the
download stage does not import torch and the loader does not import spaCy.
"""
_LAZY = {
    "DataConfig": "groupvit.data.config",
    "make_train_loader": "groupvit.data.loader",
    "skipped_samples": "groupvit.data.loader",
    "DownloadConfig": "groupvit.data.config",
    "NounsConfig": "groupvit.data.config",
    "prompted_texts": "groupvit.data.prompts",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'groupvit.data' has no attribute {name!r}")
