"""Argument parsing and error reporting shared by every stage's `main(argv)`."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from groupvit.config import KNOWN_SECTIONS, BaseConfig, load_section, parse_overrides
from groupvit.errors import ConfigError, DataError

T = TypeVar("T")
log = logging.getLogger("groupvit.config")

# The params sections each command reads (the `params:` of its dvc.yaml stage, plus optional ones such as the
# download stage's `tracking`). An override of a known section outside this set is legal but does nothing in this
# command: it is worth one warning, as `groupvit evaluate --set train.steps=3` looks like it retrains.
# `ablate` passes every other override on to the train and evaluate runs of its variants.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "synth": ("base", "synth"),
    "download": ("download", "tracking"),
    "nouns": ("nouns",),
    "train": ("base", "model", "data", "train", "tracking"),
    "evaluate": ("base", "evaluate", "tracking"),
    "segment": ("evaluate",),
    "demo": ("evaluate", "synth"),
    "ablate": KNOWN_SECTIONS,
}


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options every stage accepts: `--params FILE` and repeated `--set section.key=value`."""
    p = argparse.ArgumentParser(prog=f"groupvit {prog}", description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one params key (repeatable), value parsed as YAML")
    p.set_defaults(_stage=prog, _overrides_checked=False)  # for the check of `--set` against `STAGE_SECTIONS`
    return p


def _warn_unread_overrides(args: argparse.Namespace) -> None:
    """Once per command line: warn about `--set` overrides of sections this command never reads."""
    if getattr(args, "_overrides_checked", True):  # namespaces not made by `stage_parser` are not checked
        return
    args._overrides_checked = True
    reads = STAGE_SECTIONS.get(args._stage)
    if reads is None:
        return
    unread = sorted({keys[0] for keys, _ in parse_overrides(args.overrides)} - set(reads))
    if unread:
        log.warning("--set: `groupvit %s` does not read section%s %s (it reads %s); those overrides have no effect",
                    args._stage, "s" if len(unread) > 1 else "", ", ".join(unread), ", ".join(reads))


def load(cls: type[T], args: argparse.Namespace, section: str, required: bool = True) -> T:
    """Load the stage's typed config from the parsed `--params`/`--set` arguments.

    Raises:
        ConfigError: a missing (when `required`) or malformed section, an unknown section or a bad `--set`.
    """
    cfg = load_section(cls, args.params, section, args.overrides, required=required)
    _warn_unread_overrides(args)  # after the load: a bad override is an error first
    return cfg


def load_base(args: argparse.Namespace) -> BaseConfig:
    """The shared `base` section (`base.seed`), read the same way by every stage; absent means the defaults."""
    return load(BaseConfig, args, "base", required=False)


def error_message(e: BaseException) -> str:
    """The one-line message of a user error, also when a DataLoader worker raised it.

    PyTorch re-raises a worker's exception in the main process as the same type with a message made of the worker's
    whole traceback; its last line is `module.Type: <the original message>`.
    """
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_stage(body: Callable[[], Any]) -> int:
    """Run a stage body: configuration and input errors print one clear line and return 2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = body()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return int(result or 0)
