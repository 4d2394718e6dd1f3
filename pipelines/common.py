"""Argument parsing and error reporting shared by every stage's `main(argv)`."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, TypeVar

from groupvit.config import load_section
from groupvit.errors import ConfigError, DataError

T = TypeVar("T")


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options every stage accepts: `--params FILE` and repeated `--set section.key=value`."""
    p = argparse.ArgumentParser(prog=f"groupvit {prog}", description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one params key (repeatable), value parsed as YAML")
    return p


def load(cls: type[T], args: argparse.Namespace, section: str) -> T:
    """Load the stage's typed config from the parsed `--params`/`--set` arguments."""
    return load_section(cls, args.params, section, args.overrides)


def run_stage(body: Callable[[], Any]) -> int:
    """Run a stage body: configuration and input errors print one clear line and return 2, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = body()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)
