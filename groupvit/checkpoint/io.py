"""Reading and writing checkpoint files safely: safetensors, or `torch.load(weights_only=True)`; never a pickle that
can run code. Writes are atomic (temporary file or folder, then `os.replace`).

Layouts (detected from the file, see docs/checkpoints.md):
- `official`: a `.pth` holding `{"model": state_dict, ...}` in NVlabs/GroupViT names (Conv1d heads, fused qkv);
- `hf`: a transformers `GroupViTModel` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`) or a bare
  state dict in HF names;
- `groupvit`: this project's folder (`config.json` = `ModelConfig` dict + `model.safetensors`, official names,
  Linear heads).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from groupvit.errors import DataError

LAYOUTS = ("official", "hf", "groupvit")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
OFFICIAL_CONFIG_KEY = "groupvit_config"  # our ModelConfig dict, stored beside "model" in exported .pth files


@dataclass
class RawCheckpoint:
    """A checkpoint as found on disk: tensors under the file's own names.

    Attributes:
        layout: one of LAYOUTS.
        state: name -> tensor, in the layout's names.
        meta: the config found beside the weights (HF `config.json`, our `ModelConfig` dict) or None.
        source: the path, for messages.
    """

    layout: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] | None
    source: str


class _Opaque:
    """Stand-in for any non-tensor class pickled beside the weights (the reference saves its OmegaConf config,
    optimizer and metrics in the same file). It swallows its arguments and state: nothing is imported or run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Opaque":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def torch_load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)`; classes outside the weights-only allow-list (e.g. the reference's OmegaConf
    config) are replaced by inert `_Opaque` objects instead of being imported, so the tensors still load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - weights_only raises UnpicklingError or RuntimeError
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a torch zip file at all
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(first).__name__}: {first})") from first
        if not names:
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(first).__name__}: {first})") from first
        stubs = [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in names]
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - e.g. a global of a blocked module (os, subprocess)
            raise DataError(f"{path}: refused to load, the file pickles objects that are not weights "
                            f"({', '.join(names[:5])}): {str(e).strip().splitlines()[-1]}") from e


def _tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"{where}: expected a non-empty mapping of parameter names to tensors, found "
                        f"{type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{where}: entry {key!r} is a {type(value).__name__}, expected a tensor")
    return dict(obj)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _layout_of_names(state: dict[str, torch.Tensor], source: str) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        return "hf"
    if any(k.startswith(("img_encoder.", "module.img_encoder.", "_orig_mod.img_encoder.")) for k in state):
        return "official" if any(v.ndim == 3 and k.endswith("linear_out.weight") for k, v in state.items()) \
            else "groupvit"
    raise DataError(f"{source}: neither GroupViT tensor names (img_encoder.*) nor Hugging Face names "
                    f"(vision_model.*); first names: {list(state)[:3]}")


def _is_hf_config(meta: dict[str, Any]) -> bool:
    return "vision_config" in meta or "text_config" in meta or meta.get("model_type") == "groupvit"


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read any supported checkpoint (folder or file) without building a model.

    Raises:
        FileNotFoundError: nothing at `path`, or a folder without weights.
        DataError: the file is not a GroupViT checkpoint in a known layout (says why).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or folder")
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: folder holds none of {list(WEIGHT_FILES)}")
        if not (path / CONFIG_FILE).is_file():
            raise DataError(f"{path}: {CONFIG_FILE} missing beside {weights.name} (needed for the architecture)")
        meta = _read_json(path / CONFIG_FILE)
        state = _tensors(load_file(weights) if weights.suffix == ".safetensors" else torch_load_weights(weights),
                         str(weights))
        layout = "hf" if _is_hf_config(meta) else "groupvit"
        return RawCheckpoint(layout, state, meta, str(path))
    if path.suffix == ".safetensors":
        state = _tensors(load_file(path), str(path))
        sibling = path.parent / CONFIG_FILE
        return RawCheckpoint(_layout_of_names(state, str(path)), state,
                             _read_json(sibling) if sibling.is_file() else None, str(path))
    obj = torch_load_weights(path)
    meta = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # the reference's training checkpoint
        meta = obj.get(OFFICIAL_CONFIG_KEY) if isinstance(obj.get(OFFICIAL_CONFIG_KEY), dict) else None
        state = _tensors(obj["model"], f"{path} ['model']")
        layout = _layout_of_names(state, str(path))
        return RawCheckpoint("official" if layout == "groupvit" else layout, state, meta, str(path))
    state = _tensors(obj, str(path))
    return RawCheckpoint(_layout_of_names(state, str(path)), state, meta, str(path))


def _replace(tmp: Path, dst: Path) -> None:
    """Move `tmp` to `dst`, replacing what is there; a folder is swapped in, the old one removed afterwards."""
    if tmp.is_dir() and dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, dst)


def write_atomic(dst: str | Path, write: Callable[[Path], None], folder: bool) -> None:
    """Run `write(tmp)` on a temporary file or folder beside `dst`, then move it into place; on any error the
    previous `dst` is left untouched and the temporary is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        write(tmp)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def save_safetensors_folder(dst: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """`dst/model.safetensors` + `dst/config.json`, written atomically as one folder."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_atomic(dst, write, folder=True)


def save_official(dst: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A reference-style `.pth`: `{"model": state_dict, "groupvit_config": ModelConfig dict}` (plain tensors and
    builtins only, so `torch.load(weights_only=True)` reads it)."""
    payload = {"model": {k: v.detach().contiguous() for k, v in state.items()}, OFFICIAL_CONFIG_KEY: config}
    write_atomic(dst, lambda tmp: torch.save(payload, tmp), folder=False)
