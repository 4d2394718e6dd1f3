"""Starting the processes of a training job: torchrun workers on this machine, and each worker's set-up.

    opts = LaunchOptions(nproc=resolve_nproc(cfg.nproc))
    rc = launch(opts, ["-m", "pipelines.stages.train", "--worker", *argv])    # torchrun's exit status
    ...
    with worker_process(cfg.dist_timeout_s, threads=cfg.threads) as (info, device):   # in each worker
        fit(..., info=info, device=device)

The parent waits for torchrun and forwards SIGTERM, SIGINT and SIGHUP to it, so a cancelled DVC or Prefect run stops
the workers too, and a SIGKILL of the parent takes torchrun and the workers with it; torchrun's agent stops the other
workers and exits non-zero when one dies (no hang). Used by `groupvit train` and `benchmarks/train_throughput.py`.
Options for several machines (nodes, node rank, rendezvous endpoint) belong in `LaunchOptions` and its
`torchrun_args`; today the workers of a multi-node job are started with torchrun by hand (README, "Training").
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the launching parent needs it only for `nproc: auto`
    import torch

    from groupvit.training.distributed import DistInfo

log = logging.getLogger("groupvit.launch")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True)
class LaunchOptions:
    """How torchrun starts the workers: `nproc` processes on this machine (`--standalone` rendezvous).

    Attributes:
        nproc: worker processes on this machine.
        max_restarts: times torchrun restarts the whole group after a failure (0: a failure ends the job; a rerun
            resumes from the last checkpoint).
    """

    nproc: int = 1
    max_restarts: int = 0

    def torchrun_args(self) -> list[str]:
        """torchrun's options for these settings (before the worker's own command)."""
        return ["--standalone", f"--nproc_per_node={self.nproc}", f"--max_restarts={self.max_restarts}"]


def resolve_nproc(nproc: int | str) -> int:
    """`train.nproc`: `auto` is one process per visible GPU, else 1; a number is itself."""
    if nproc != "auto":
        return int(nproc)
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_command(opts: LaunchOptions, target: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run <opts> <target>`; `target` is `["-m", "module", ...]` or `[script, ...]`."""
    return [sys.executable, "-m", "torch.distributed.run", *opts.torchrun_args(), *target]


def run_forwarding_signals(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                           output: IO[Any] | None = None) -> int:
    """Run `cmd` and wait for it, passing SIGTERM/SIGINT/SIGHUP on to it (from the main thread only, where Python
    can handle signals); returns its exit status (negative: killed by that signal). `cmd` and all it starts die
    with this process, however it dies (`groupvit.procs.TiedProcess`).

    Args:
        cmd: the command line.
        env, cwd: its environment and folder (default: this process's).
        output: a file that receives its stdout and stderr (default: this process's streams).
    """
    from groupvit.procs import TiedProcess

    streams = {"stdout": output, "stderr": subprocess.STDOUT} if output is not None else {}
    # tied: a SIGKILL of this process (a killed `groupvit train`) takes torchrun and every worker with it, instead of
    # leaving them to train on and publish a model nobody asked for any more
    proc = TiedProcess(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, **streams)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS} if main else {}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def launch(opts: LaunchOptions, target: Sequence[str], env: Mapping[str, str] | None = None,
           cwd: str | None = None, output: IO[Any] | None = None) -> int:
    """Run `target` as `opts.nproc` torchrun workers on this machine and wait; returns torchrun's exit status.

    Args:
        opts: the launch options.
        target: the worker's command after torchrun's options (`["-m", "pipelines.stages.train", "--worker", ...]`).
        env, cwd, output: as for `run_forwarding_signals`.
    """
    cmd = torchrun_command(opts, target)
    log.info("launching %d processes: %s", opts.nproc, " ".join(cmd))
    return run_forwarding_signals(cmd, env, cwd, output)


def setup_backend(device: torch.device, threads: int = 0, local_world_size: int = 1) -> None:
    """Per-process compute settings: on CPU `threads` intra-op threads (0: this machine's cores shared evenly by its
    `local_world_size` processes); on CUDA TF32 matmuls and convolutions and cuDNN autotuning."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world_size))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def worker_process(timeout_s: float, threads: int = 0, cpu: bool = False) -> Iterator[tuple[DistInfo, torch.device]]:
    """`with worker_process(...) as (info, device):` one worker: joined to the process group (under torchrun), its
    device chosen and set up (`setup_backend`); the group is left on the way out.

    In the main thread SIGTERM unwinds the worker (exit status 143): torchrun stops the surviving workers with it, and
    unwinding runs the `finally`/`with` blocks (an MLflow run is marked failed, not left running).

    Args:
        timeout_s: bound of every collective (`train.dist_timeout_s`).
        threads: CPU threads of this process (0: cores / processes on this machine).
        cpu: train on the CPU even when a GPU is visible.
    """
    import torch

    from groupvit.training.distributed import destroy_distributed, device_for, init_distributed

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        info = init_distributed(timeout_s)
        try:
            device = torch.device("cpu") if cpu else device_for(info)
            setup_backend(device, threads, info.local_world_size)
            yield info, device
        finally:
            destroy_distributed()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
