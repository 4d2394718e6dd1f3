"""Reading and writing checkpoint files safely: safetensors, or `torch.load(weights_only=True)`; never a pickle that
can run code. Writes are atomic (temporary file or folder, then `os.replace`; model folders through
`groupvit.atomic.atomic_dir`).

Layouts (detected from the file, see docs/checkpoints.md):
- `official`: a `.pth` holding `{"model": state_dict, ...}` in NVlabs/GroupViT names (Conv1d heads, fused qkv);
- `hf`: a transformers `GroupViTModel` folder (`config.json` + `model.safetensors` or `pytorch_model.bin`) or a bare
  state dict in HF names;
- `groupvit`: this project's folder (`config.json` = `ModelConfig` dict + `model.safetensors`, official names,
  Linear heads).

A file that cannot be read (truncated, corrupt, not a checkpoint) is a `CheckpointError` naming it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file

from groupvit.atomic import atomic_dir
from groupvit.errors import DataError

LAYOUTS = ("official", "hf", "groupvit")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
OFFICIAL_CONFIG_KEY = "groupvit_config"  # our ModelConfig dict, stored beside "model" in exported .pth files
TRAINING_CONFIG_KEY = "config"  # the reference's whole training config (an OmegaConf DictConfig) in its .pth files


class CheckpointError(DataError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint) or that is refused (it pickles
    objects that are not weights); the message names the file."""


@dataclass
class RawCheckpoint:
    """A checkpoint as found on disk: tensors under the file's own names.

    Attributes:
        layout: one of LAYOUTS.
        state: name -> tensor, in the layout's names.
        meta: the config found beside the weights (HF `config.json`, our `ModelConfig` dict) or None.
        source: the path, for messages.
        training_config: the file also holds the reference's training config (read by `read_training_config`
            when the architecture is needed).
    """

    layout: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] | None
    source: str
    training_config: bool = False  # an official .pth with the reference's training config under "config"


class _Opaque:
    """Stand-in for any non-tensor class pickled beside the weights (the reference saves its OmegaConf config,
    optimizer and metrics in the same file). It swallows its arguments and state: nothing is imported or run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _cause(e: BaseException) -> str:
    """One short line for an exception (for torch's weights-only errors, the part after its long preamble)."""
    text = str(e).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"


def _unreadable(path: Path, kind: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable {kind} file, truncated or corrupt? ({_cause(e)}); download or "
                           "export it again")


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file.

    Raises:
        CheckpointError: the file is truncated or corrupt (safetensors' own error, with the file name).
    """
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, and whatever a damaged header raises
        raise _unreadable(path, "safetensors", e) from e


def torch_load_weights(path: Path) -> Any:
    """`torch.load(weights_only=True)`; classes outside the weights-only allow-list (e.g. the reference's OmegaConf
    config) are replaced by inert `_Opaque` objects instead of being imported, so the tensors still load.

    Raises:
        CheckpointError: the file is truncated or corrupt, or pickles a global of a blocked module (`os.system`).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:  # what weights_only raises for a global outside its allow-list
        if _is_legacy_torch_file(path):  # the stand-ins below need the zip format's global list
            raise CheckpointError(f"{path}: pickles objects other than weights in torch's pre-1.6 (non-zip) format, "
                                  f"which is read only for plain weights ({_cause(first)})") from first
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged pickle
            raise _unreadable(path, "PyTorch checkpoint", e) from e
        if not names:
            raise _unreadable(path, "PyTorch checkpoint", first) from first
        stubs = [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in names]
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - e.g. a global of a blocked module (os, subprocess)
            raise CheckpointError(f"{path}: refused to load, the file pickles objects that are not weights "
                                  f"({', '.join(names[:5])}): {str(e).strip().splitlines()[-1]}") from e
    except Exception as e:  # noqa: BLE001 - RuntimeError (zip reader), EOFError, UnicodeDecodeError, ...
        raise _unreadable(path, "PyTorch checkpoint", e) from e


# ---- the reference's training config, read without running anything ---------------------------------------------
#
# NVlabs/GroupViT's `save_checkpoint` stores {"model", "optimizer", "lr_scheduler", "metrics", "epoch", "config", ...}
# in one pickle; "config" is the whole training config, an OmegaConf DictConfig whose `model` section holds the
# architecture (heads, hard assignment). `torch.load(weights_only=True)` refuses that class, so the pickle is read a
# second time by `_ConfigUnpickler`, which imports nothing: the OmegaConf containers and value nodes below become
# inert records of their pickled state (a DictConfig / ListConfig keeps its items in `_content`, a node its value in
# `_val`), a few dict classes become plain dicts, and every other global becomes a named `_Foreign` placeholder that
# is never called. Only the config is converted, to plain dicts and lists; a placeholder inside it refuses the file.
_RECORD_CLASSES = frozenset({
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode", "omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata",
})
_DICT_CLASSES = frozenset({"collections.OrderedDict", "collections.defaultdict", "builtins.dict"})
_MAX_PICKLE_BYTES = 256 << 20  # data.pkl holds structure only (tensors are separate records): MBs at most
_MAX_DEPTH = 200  # nesting of the config (3 levels per OmegaConf level); deeper, or a cycle, is no config
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-zip format starts with this pickled number


class _Record:
    """An admitted OmegaConf object: keeps the state its pickle sets, runs no code of the class it stands for."""

    global_name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Foreign(_Record):
    """Any other global (optimizer classes, numpy scalars, tensor rebuilders, ...): remembered by name, inert."""

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a foreign mapping
        pass

    def append(self, value: Any) -> None:  # APPENDS on a foreign sequence
        pass

    def extend(self, values: Any) -> None:
        pass


class _PlainDict(dict):
    """OrderedDict / defaultdict rebuilt as a dict (with a `__dict__`, as `state_dict()` sets `_metadata` on it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()


class _ConfigUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's structure, importing and calling nothing from the file (see above)."""

    def __init__(self, file: BinaryIO):
        super().__init__(file)
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 2 spellings
        full = f"{module}.{name}"
        if full in _DICT_CLASSES:
            return _PlainDict
        if full not in self._classes:
            base = _Record if full in _RECORD_CLASSES else _Foreign
            self._classes[full] = type(name, (base,), {"global_name": full})
        return self._classes[full]

    def persistent_load(self, pid: Any) -> Any:  # a tensor storage: not read
        return self.find_class("torch", "storage")()


def _is_legacy_torch_file(path: Path) -> bool:
    """A `torch.save` file in the pre-1.6 format (a sequence of pickles starting with torch's magic number)."""
    if zipfile.is_zipfile(path):
        return False
    try:
        with path.open("rb") as f:
            head = io.BytesIO(f.read(64))  # the magic number pickles to 15 bytes: parse no more of an unknown file
        return _ConfigUnpickler(head).load() == _LEGACY_MAGIC
    except Exception:  # noqa: BLE001 - not a pickle at all
        return False


def _unpickle_structure(path: Path) -> Any:
    """The top object of a `torch.save` file (zip or pre-zip format), tensors as placeholders."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                raise CheckpointError(f"{path}: a zip file without the data.pkl of torch.save")
            if z.getinfo(names[0]).file_size > _MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: {names[0]} is over {_MAX_PICKLE_BYTES >> 20} MiB, not a checkpoint")
            with z.open(names[0]) as f:
                return _ConfigUnpickler(f).load()
    with path.open("rb") as f:  # magic number, protocol, system info, then the object
        unpickler = _ConfigUnpickler(f)
        if unpickler.load() != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch.save file")
        for _ in range(2):  # protocol version, system info
            unpickler.load()
        return unpickler.load()


def _plain(obj: Any, where: str, depth: int = 0) -> Any:
    """The config as plain dicts, lists and scalars (interpolations stay strings such as '${data.x}')."""
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if isinstance(obj, _Foreign):
        raise CheckpointError(f"{where}: holds a pickled {obj.global_name}, which the config reader does not admit "
                              "(only OmegaConf containers and plain values); it was not loaded")
    if isinstance(obj, _Record):
        state = obj.state if isinstance(obj.state, dict) else {}
        if obj.global_name.endswith(("DictConfig", "ListConfig")):
            return _plain(state.get("_content"), where, depth + 1)  # None, '???' or an interpolation when no items
        if obj.global_name.startswith("omegaconf.nodes."):
            return _plain(state.get("_val"), where, depth + 1)
        raise CheckpointError(f"{where}: unexpected {obj.global_name} in the config")
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise CheckpointError(f"{where}: a key of type {type(key).__name__}")
            out[key] = _plain(value, f"{where}.{key}", depth + 1)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CheckpointError(f"{where}: a value of type {type(obj).__name__}, expected plain data")


def read_training_config(path: str | Path) -> dict[str, Any]:
    """The reference's training config embedded in an official `.pth` (`["config"]`), as plain dicts and lists.

    Reads the file's pickle with an unpickler that imports and runs nothing (the weights are read separately, with
    `torch.load(weights_only=True)`). OmegaConf interpolations (`${data.text_aug.multi_label}`) are left as strings.

    Raises:
        CheckpointError: the pickle is damaged, has no `config` mapping, or the config holds any object other than
            OmegaConf containers and plain values (named; never loaded).
    """
    path = Path(path)
    where = f"{path} ['{TRAINING_CONFIG_KEY}']"
    try:
        top = _unpickle_structure(path)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises anything from EOFError to ValueError
        raise _unreadable(path, "PyTorch checkpoint", e) from e
    if not isinstance(top, dict) or TRAINING_CONFIG_KEY not in top:
        raise CheckpointError(f"{path}: no '{TRAINING_CONFIG_KEY}' entry beside the weights")
    config = _plain(top[TRAINING_CONFIG_KEY], where)
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: expected a mapping (the reference's OmegaConf config), found "
                              f"{type(config).__name__}")
    return config


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
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # a truncated or binary-garbled config.json
        raise CheckpointError(f"{path}: unreadable JSON, truncated or corrupt? ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
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
        CheckpointError: a file is truncated, corrupt or refused (names it).
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
        state = _tensors(load_safetensors(weights) if weights.suffix == ".safetensors" else torch_load_weights(weights),
                         str(weights))
        layout = "hf" if _is_hf_config(meta) else "groupvit"
        return RawCheckpoint(layout, state, meta, str(path))
    if path.suffix == ".safetensors":
        state = _tensors(load_safetensors(path), str(path))
        sibling = path.parent / CONFIG_FILE
        return RawCheckpoint(_layout_of_names(state, str(path)), state,
                             _read_json(sibling) if sibling.is_file() else None, str(path))
    obj = torch_load_weights(path)
    meta = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # the reference's training checkpoint
        meta = obj.get(OFFICIAL_CONFIG_KEY) if isinstance(obj.get(OFFICIAL_CONFIG_KEY), dict) else None
        state = _tensors(obj["model"], f"{path} ['model']")
        layout = _layout_of_names(state, str(path))
        return RawCheckpoint("official" if layout == "groupvit" else layout, state, meta, str(path),
                             training_config=meta is None and TRAINING_CONFIG_KEY in obj)
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


def save_safetensors_folder(dst: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], *,
                            sort_keys: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """`dst/model.safetensors` + `dst/config.json`: the one writer of model folders (`groupvit train`'s `data/model`,
    `save_pretrained`, `groupvit convert`), built in a temporary folder and swapped in (`groupvit.atomic.atomic_dir`).

    Args:
        dst: the folder; replaced when it exists, untouched when writing fails.
        state: name -> tensor, written with its dtype (from CPU copies; safetensors' metadata `{"format": "pt"}`).
        config: `config.json`, as `json.dumps(config, indent=2) + "\n"` (keys in the dict's order: a `ModelConfig`
            dict keeps its field order).
        sort_keys: sort the keys of `config.json` (the HF layout, as transformers writes it).
        extra: `extra(tmp)` writes more files into the new folder before it is swapped in (the train stage's
            `resolved_config.yaml`).

    Returns:
        `dst`.
    """
    # safetensors refuses shared storage and non-contiguous views: give every entry its own contiguous CPU copy
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_dir(dst) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")
        if extra is not None:
            extra(tmp)
    return Path(dst)


def save_official(dst: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """A reference-style `.pth`: `{"model": state_dict, "groupvit_config": ModelConfig dict}` (plain tensors and
    builtins only, so `torch.load(weights_only=True)` reads it)."""
    payload = {"model": {k: v.detach().contiguous() for k, v in state.items()}, OFFICIAL_CONFIG_KEY: config}
    write_atomic(dst, lambda tmp: torch.save(payload, tmp), folder=False)
