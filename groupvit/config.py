"""Typed, frozen stage configuration read from one `params.yaml` section.

Every stage owns a frozen dataclass. `load_section` reads the YAML file, applies `--set section.key=value`
overrides, and builds the dataclass, rejecting unknown keys, wrong types and out-of-range values *before* any work
starts, with an error that names the file, the key, what was expected and what was found. A top-level section no
module reads (`KNOWN_SECTIONS`), in the file or in `--set`, is refused the same way; an empty section is warned.

Range and choice constraints live in the field metadata, declared with `param(...)`:

    @dataclass(frozen=True)
    class SynthConfig:
        num_train: int = param(1000, ge=1, help="training images")
        image_size: int = param(96, ge=16, le=1024)
        mode: str = param("slide", choices=("slide", "whole"))
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from groupvit.atomic import atomic_write
from groupvit.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Every top-level section of params.yaml that some stage or module reads (stages, pipelines.flows/serve/ablation).
# Anything else, in the file or in `--set`, is a typo (`trian.steps=3`) or a key that lost its indentation, and would
# otherwise be ignored while the stage runs with the defaults: read_params refuses it.
KNOWN_SECTIONS = ("base", "synth", "download", "nouns", "data", "model", "train", "evaluate", "tracking", "prefect",
                  "ablate")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 8e-4, 1E+3: YAML 1.1 strings


def param(default: Any = dataclasses.MISSING, *, ge: float | None = None, le: float | None = None,
          gt: float | None = None, lt: float | None = None, choices: Iterable[Any] | None = None,
          help: str = "") -> Any:
    """A dataclass field with validation metadata (bounds apply to numbers and to each item of a tuple)."""
    meta = {"ge": ge, "le": le, "gt": gt, "lt": lt, "choices": tuple(choices) if choices is not None else None,
            "help": help}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default, configs are frozen")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """The shared `base` section of params.yaml (optional: a params file without it gets the defaults)."""

    seed: int = param(0, ge=0, help="seed of every random choice of every stage")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return "list [" + ", ".join(_type_name(a) for a in args) + "]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (lists become tuples). Raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, found {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
            if len(args) == len(value):
                return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return build(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads `8e-4` without a dot as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, found {value!r} ({type(value).__name__})")


def _check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{where}: expected one of {list(meta['choices'])}, found {v!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        bounds = [("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                  ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")]
        for key, ok, sym in bounds:
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{where}: expected a value {sym} {bound}, found {v!r}")


def build(cls: type[T], section: typing.Mapping[str, Any] | None, where: str) -> T:
    """Build the frozen dataclass `cls` from a mapping; `where` prefixes every error (e.g. 'params.yaml: train')."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, found {section!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key_where = f"{where}.{name}"
        if name not in section:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{key_where}: missing required key ({_type_name(hints[name])})")
            continue
        value = _coerce(section[name], hints[name], key_where)
        _check_range(value, f.metadata, key_where)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # __post_init__ cross-field checks
        raise ConfigError(f"{where}: {e}") from None
    return obj


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A PyYAML error as one line: what is wrong and where (PyYAML's own message spans several lines)."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """`["train.lr=0.001", "model.depths=[2,2]"]` -> [(["train", "lr"], 0.001), ...] (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, _, raw = item.partition("=")
        path = key.strip().split(".")
        if len(path) < 2 or not all(path):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        if path[0] not in KNOWN_SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {path[0]!r} (known sections: "
                              f"{', '.join(KNOWN_SECTIONS)})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(e)})") from None
        parsed.append((path, value))
    return parsed


def read_params(params_file: str | os.PathLike[str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The whole params file as a dict, with overrides applied; unknown sections (file or `--set`) are refused."""
    path = Path(params_file)
    parsed = parse_overrides(overrides)  # a bad --set is reported even when the file is the problem too
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = [k for k in raw if k not in KNOWN_SECTIONS]
    if unknown:
        hint = "" if isinstance(raw[unknown[0]], dict) else "; a key of the section above that lost its indentation?"
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (known sections: {', '.join(KNOWN_SECTIONS)})"
                          f"{hint}")
    return _set_all(raw, parsed, str(path))


def _set_all(raw: dict[str, Any], parsed: list[tuple[list[str], Any]], where: str) -> dict[str, Any]:
    for keys, value in parsed:
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or an empty section (`train:` with nothing under it)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: --set {'.'.join(keys)}: {k} is not a mapping")
        node[keys[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str], where: str = "params") -> dict[str, Any]:
    """`raw` (a params dict, changed in place and returned) with `section.key=value` overrides applied in order, as
    `--set` applies them; `where` names the source in errors."""
    return _set_all(raw, parse_overrides(overrides), where)


@functools.cache
def _warn_empty_section(params_file: str, section: str) -> None:
    """Once per file and section: stages load their sections more than once (the train stage: parent and worker)."""
    log.warning("%s: section '%s' is empty: every %s key takes its default", params_file, section, section)


def load_section(cls: type[T], params_file: str | os.PathLike[str], section: str,
                 overrides: Iterable[str] = (), required: bool = True) -> T:
    """Read `section` of `params_file` (after `--set` overrides) into the frozen dataclass `cls`."""
    raw = read_params(params_file, overrides)
    if section not in raw:
        if required:
            raise ConfigError(f"{params_file}: missing section '{section}' (sections found: {', '.join(raw)})")
        return build(cls, {}, f"{params_file}: {section}")
    if raw[section] is None:
        # Warned, not refused: a section left empty is what commenting out all its keys leaves, and "all defaults"
        # is then what was meant. The harmful look-alike, keys that lost their indentation under `train:`, puts
        # them at the top level, where read_params refuses them as unknown sections.
        _warn_empty_section(str(params_file), section)
    return build(cls, raw[section], f"{params_file}: {section}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON/YAML-serialisable dict of a (nested) config dataclass; tuples become lists."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def save_resolved(path: str | os.PathLike[str], **configs: Any) -> Path:
    """Write the resolved configs of a run beside its outputs (`resolved_config.yaml`), atomically."""
    text = yaml.safe_dump({k: to_dict(v) for k, v in configs.items()}, sort_keys=False)
    return atomic_write(path, text)


def flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"model.depths": "[2, 2]", ...}`: a flat view for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in to_dict(cfg).items() if not isinstance(cfg, dict) else cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_dict(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out
