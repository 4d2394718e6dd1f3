"""The DVC workspace as the orchestrators see it (no Prefect here, so the CLI and the tests share it).

- `workspace_lock`: an fcntl lock around the DVC workspace, so two overlapping retrains never interleave their
  `dvc repro` calls (DVC's own repo lock only covers one command; a retrain is five of them plus promotion).
- `run_streaming`: run a command, hand every output line to a callback (Prefect logs), keep the tail for errors;
  the command's whole tree dies with the caller (`groupvit.procs.TiedProcess`).
- `stage_metrics`: the metrics a `dvc.yaml` stage declares, flattened to `{"file:key.sub": value}`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from groupvit.errors import ConfigError
from groupvit.procs import TiedProcess

LOCK_NAME = ".dvc/tmp/groupvit-workspace.lock"


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the DVC workspace for longer than we were allowed to wait."""


def _short(value: str) -> str:
    return value if len(value) < 200 else value[:200] + "..."


@contextlib.contextmanager
def workspace_lock(workdir: str | os.PathLike[str], timeout: float, poll: float = 0.5,
                   on_wait: Callable[[str], None] | None = None, owner: str = "") -> Iterator[Path]:
    """Hold an exclusive lock on the DVC workspace in `workdir`; wait up to `timeout` seconds for it.

    The lock file records who holds it (pid, host, start time, `owner`), so the waiting side can say by whom it is
    blocked. The kernel releases an flock when its holder dies, so a crashed run never leaves the workspace locked.

    Raises:
        WorkspaceBusy: the lock stayed held for `timeout` seconds.
    """
    path = Path(workdir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _short(Path(path).read_text().strip()) or "unknown holder"
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"{Path(workdir).resolve()}: the DVC workspace is busy, {holder} holds {LOCK_NAME}; "
                        f"gave up after {timeout:g} s (prefect.lock_timeout_seconds). Wait for that run to finish."
                    ) from None
                if not announced and on_wait is not None:
                    on_wait(f"waiting for the DVC workspace: {holder} holds {path}")
                    announced = True
                time.sleep(poll)
        info = f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')} {owner}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.strip().encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def tool_env() -> dict[str, str]:
    """The environment for `dvc`/`groupvit` subprocesses: this interpreter's bin folder first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    seconds: float
    tail: str  # the last lines of combined stdout/stderr, for error messages


def run_streaming(cmd: list[str], cwd: str | os.PathLike[str], on_line: Callable[[str], None],
                  tail_lines: int = 30, env: dict[str, str] | None = None,
                  stop_timeout: float = 60.0) -> CommandResult:
    """Run `cmd` in `cwd`, calling `on_line` for each line of its combined output as it arrives.

    `cmd` runs as a `TiedProcess`: a `dvc repro` and the stage under it die with this process even when it is
    SIGKILLed (Prefect's hard cancellation, the OOM killer), instead of writing the workspace on. When this call is
    interrupted (Ctrl-C, Prefect's SIGTERM cancellation, an error in `on_line`), the whole tree gets SIGINT, as a
    terminal's Ctrl-C would deliver it (DVC ignores SIGINT while its stage runs: the stage must get it to stop
    cleanly), and SIGKILL after `stop_timeout` seconds.
    """
    start = time.monotonic()
    tail: deque[str] = deque(maxlen=tail_lines)
    proc = TiedProcess(cmd, cwd=cwd, env=env or tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, errors="replace", bufsize=1)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                on_line(line)
        returncode = proc.wait()
    except BaseException:
        _interrupt(proc, stop_timeout)
        raise
    finally:
        proc.stdout.close()
    return CommandResult(returncode, time.monotonic() - start, "\n".join(tail))


def _interrupt(proc: TiedProcess, timeout: float) -> None:
    """SIGINT to every process of `proc`'s tree (its process group), then SIGKILL if it has not ended in `timeout` s.

    The watchdog, which leads the group, forwards its SIGINT to `cmd` too: `cmd` may get two, as from a double Ctrl-C.
    """
    if proc.poll() is not None:  # ended and reaped: its group id may belong to someone else by now
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    except BaseException:  # a second Ctrl-C while waiting: no more patience
        proc.kill()
        raise


def load_dvc_yaml(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(workdir) / "dvc.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (the orchestrator runs the stages of a DVC pipeline)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data.get("stages"), dict):
        raise ConfigError(f"{path}: expected a `stages:` mapping")
    return data


def _entry_paths(entries: list[Any] | None) -> list[str]:
    """DVC lists outs/metrics as plain strings or one-key mappings `{path: {cache: false}}`."""
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [1, 2]}` -> `{"a.b": 1, "c": [1, 2]}` (numbers, strings and short lists kept)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def stage_metrics(workdir: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    """The JSON/YAML metrics the stage declares in dvc.yaml, flattened as `{"<file name>:<key>": value}`."""
    spec = load_dvc_yaml(workdir)["stages"].get(stage)
    if spec is None:
        raise ConfigError(f"{Path(workdir) / 'dvc.yaml'}: no stage named {stage!r}")
    out: dict[str, Any] = {}
    for rel in _entry_paths(spec.get("metrics")):
        path = Path(workdir) / rel
        if path.is_file():
            text = path.read_text()
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
            out.update({f"{path.name}:{k}": v for k, v in flatten(data).items()})
    return out


def read_metric(workdir: str | os.PathLike[str], spec: str) -> float:
    """Read `<file in metrics/>:<dotted key>` (e.g. `evaluate.json:miou`) as a float."""
    file, _, key = spec.partition(":")
    path = Path(workdir) / "metrics" / file
    if not path.is_file():
        raise ConfigError(f"prefect.promote_metric={spec!r}: {path} not found")
    value: Any = json.loads(path.read_text())
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"prefect.promote_metric={spec!r}: no key {key!r} in {path}")
        value = value[part]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"prefect.promote_metric={spec!r}: {path} {key} is {value!r}, expected a number")
    return float(value)
