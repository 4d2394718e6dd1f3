"""Starting the processes of a training job: torchrun workers on this machine, and each worker's set-up.

    opts = LaunchOptions(nproc=resolve_nproc(cfg.nproc))
    rc = launch(opts, ["-m", "pipelines.stages.train", "--worker", *argv])    # torchrun's exit status
    ...
    with worker_process(cfg.dist_timeout_s, threads=cfg.threads) as (info, device):   # in each worker
        fit(..., info=info, device=device)

The parent waits for torchrun and forwards SIGTERM, SIGINT and SIGHUP to it, so a cancelled DVC or Prefect run stops
the workers too, and a SIGKILL of the parent takes torchrun and the workers with it; torchrun's agent stops the other
workers and exits non-zero when one dies (no hang). Used by `groupvit train` and `benchmarks/train_throughput.py`.

Several machines: `LaunchOptions(nproc, nnodes=2, rdzv_endpoint="node0:29500")` on every node turns into torchrun's
multi-node rendezvous (`--nnodes --rdzv_backend --rdzv_endpoint --rdzv_id`, `--node_rank` for the static backend);
`groupvit train --nnodes ...` (or the `GROUPVIT_NNODES`, ... variables of `MULTINODE_ENV`) builds them.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from groupvit.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the launching parent needs it only for `nproc: auto`
    import torch

    from groupvit.training.distributed import DistInfo

log = logging.getLogger("groupvit.launch")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


RDZV_BACKENDS = ("c10d", "static")
# The environment variables `groupvit train` reads its multi-node options from when they are not given on its command
# line: `dvc repro` runs the stage with a fixed command, so a node's rank and the endpoint can only reach it this way.
MULTINODE_ENV = {"nnodes": "GROUPVIT_NNODES", "node_rank": "GROUPVIT_NODE_RANK",
                 "rdzv_endpoint": "GROUPVIT_RDZV_ENDPOINT", "rdzv_id": "GROUPVIT_RDZV_ID",
                 "rdzv_backend": "GROUPVIT_RDZV_BACKEND"}


@dataclass(frozen=True)
class LaunchOptions:
    """How torchrun starts the workers: `nproc` processes on this machine, alone (`--standalone`) or as one of
    `nnodes` machines that meet at `rdzv_endpoint`.

    Attributes:
        nproc: worker processes on this machine.
        max_restarts: times torchrun restarts the whole group after a failure (0: a failure ends the job; a rerun
            resumes from the last checkpoint).
        nnodes: machines in the job (1: this one only).
        node_rank: this machine's place, 0 .. nnodes-1 (static rendezvous only: c10d numbers the machines itself).
        rdzv_endpoint: `host:port` every machine reaches (c10d: an agent on that host serves the rendezvous; static:
            node 0 is that host).
        rdzv_id: the job's name at the rendezvous, the same on every machine.
        rdzv_backend: `c10d` (the machines may start in any order; global ranks follow the sorted host names, then
            the agents' process ids) or `static` (node `node_rank` holds ranks node_rank*nproc ...).

    Raises:
        ConfigError: a multi-node option out of range or missing.
    """

    nproc: int = 1
    max_restarts: int = 0
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    rdzv_id: str = "groupvit"
    rdzv_backend: str = "c10d"

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes: expected a number of machines >= 1, found {self.nnodes}")
        if self.rdzv_backend not in RDZV_BACKENDS:
            raise ConfigError(f"--rdzv-backend: expected one of {', '.join(RDZV_BACKENDS)}, "
                              f"found {self.rdzv_backend!r}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank: expected 0 .. {self.nnodes - 1} for {self.nnodes} nodes, "
                              f"found {self.node_rank}")
        if self.nnodes == 1:
            return
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--rdzv-endpoint: expected host:port that every node reaches (e.g. node0:29500) "
                              f"for {self.nnodes} nodes, found {self.rdzv_endpoint!r}")
        if self.node_rank and self.rdzv_backend == "c10d":
            raise ConfigError(f"--node-rank {self.node_rank}: only the static rendezvous uses it (c10d numbers the "
                              "nodes itself, by host name); drop it, or add --rdzv-backend static")
        if not self.rdzv_id:
            raise ConfigError("--rdzv-id: expected the job's name, the same on every node, found ''")

    @property
    def multinode(self) -> bool:
        return self.nnodes > 1

    def torchrun_args(self) -> list[str]:
        """torchrun's options for these settings (before the worker's own command)."""
        common = [f"--nproc_per_node={self.nproc}", f"--max_restarts={self.max_restarts}"]
        if not self.multinode:
            return ["--standalone", *common]
        args = [f"--nnodes={self.nnodes}", *common, f"--rdzv_backend={self.rdzv_backend}",
                f"--rdzv_endpoint={self.rdzv_endpoint}", f"--rdzv_id={self.rdzv_id}"]
        return args + [f"--node_rank={self.node_rank}"] if self.rdzv_backend == "static" else args


def add_multinode_arguments(p: argparse.ArgumentParser) -> None:
    """`--nnodes`, `--node-rank`, `--rdzv-endpoint`, `--rdzv-id`, `--rdzv-backend`; unset ones come from the
    variables of `MULTINODE_ENV`, then `LaunchOptions`' defaults (one machine)."""
    g = p.add_argument_group("several machines (each option also read from $GROUPVIT_<NAME>, e.g. GROUPVIT_NNODES)")
    g.add_argument("--nnodes", type=int, help="machines in the job (default 1: this one only)")
    g.add_argument("--node-rank", type=int, help="this machine's rank, 0 .. nnodes-1 (static rendezvous only)")
    g.add_argument("--rdzv-endpoint", help="host:port of the rendezvous, the same on every node (e.g. node0:29500)")
    g.add_argument("--rdzv-id", help="the job's name at the rendezvous, the same on every node (default groupvit)")
    g.add_argument("--rdzv-backend", choices=RDZV_BACKENDS,
                   help="c10d (default: nodes start in any order, ranks by host name) or static (ranks by "
                        "--node-rank; node 0 is the endpoint's host)")


def multinode_options(args: argparse.Namespace, nproc: int, env: Mapping[str, str] | None = None) -> LaunchOptions:
    """The `LaunchOptions` of `add_multinode_arguments`' options: the command line, else `MULTINODE_ENV`, else the
    defaults.

    Raises:
        ConfigError: a variable that is not a number where one is expected, or an option out of range.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field, var in MULTINODE_ENV.items():
        value = getattr(args, field, None)
        if value is None and env.get(var):
            value = env[var]
            if field in ("nnodes", "node_rank"):
                if not value.strip().isdigit():
                    raise ConfigError(f"${var}: expected a whole number, found {value!r}")
                value = int(value)
        if value is not None:
            values[field] = value
    return LaunchOptions(nproc=nproc, **values)


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
    """Run `target` as `opts.nproc` torchrun workers on this machine (this node's share of a multi-node job) and
    wait; returns torchrun's exit status.

    Args:
        opts: the launch options.
        target: what each worker runs (see `torchrun_command`).
        env, cwd, output: as for `run_forwarding_signals`.
    """
    cmd = torchrun_command(opts, target)
    where = f" as one of {opts.nnodes} nodes ({opts.rdzv_backend} rendezvous {opts.rdzv_id!r} at " \
            f"{opts.rdzv_endpoint})" if opts.multinode else ""
    log.info("launching %d processes%s: %s", opts.nproc, where, " ".join(cmd))
    return run_forwarding_signals(cmd, env, cwd, output)


# ---- who was lost: the roster of a multi-node job ------------------------------------------------------------------

def node_roster(info: DistInfo) -> list[dict[str, Any]]:
    """Collective: every rank's node (torchrun's `GROUP_RANK`), host and torchrun agent pid, in rank order.

    A gloo or NCCL error names a socket address at best; this is what `lost_peers` turns it into a node with.
    """
    from groupvit.training.distributed import all_gather_object

    me = {"rank": info.rank, "node": int(os.environ.get("GROUP_RANK", 0)), "host": socket.gethostname(),
          "agent_pid": os.getppid()}  # a torchrun worker's parent is its node's agent
    return all_gather_object(me, info)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds the pid now: the agent is gone
        return False
    return True


def lost_peers(roster: Sequence[Mapping[str, Any]], here: int) -> str:
    """What node `here` of a failed job lost, from `node_roster` (one line; '' when it lost nothing it can see).

    Nodes on this host are checked by their agent's pid; nodes on other hosts cannot be checked from here, so they
    are named as the candidates.
    """
    nodes: dict[int, list[Mapping[str, Any]]] = {}
    for entry in roster:
        nodes.setdefault(entry["node"], []).append(entry)
    host = socket.gethostname()
    lost, unknown = [], []
    for node, entries in sorted(nodes.items()):
        if node == here:
            continue
        first = entries[0]
        what = f"node {node} (host {first['host']}, ranks {', '.join(str(e['rank']) for e in entries)}"
        if first["host"] != host:
            unknown.append(what + ")")
        elif not _alive(first["agent_pid"]):
            lost.append(what + f", torchrun agent pid {first['agent_pid']} is gone)")
    if lost:
        return (f"node {here} lost {'; '.join(lost)}: the job stopped without publishing anything; start every node "
                "again to resume from the last checkpoint")
    if unknown:
        return (f"node {here} lost contact with the job; its peers on other hosts are {'; '.join(unknown)}: one of "
                "them was lost or failed (see its log), unless the errors above are this node's own")
    return ""  # every peer is alive: the errors above are this node's own


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


AGENT_POLL_S = 0.5  # how often a torchrun worker checks that its agent is still there
ORPHAN_GRACE_S = 10.0  # how long an orphaned worker may unwind before it is killed outright


def _die_with_agent(agent: int, done: threading.Event) -> None:
    """Stop this worker once its torchrun agent `agent` is gone (until `done` is set).

    torchrun starts every worker in a session of its own, so a killed `groupvit train` (whose process group holds the
    agent) or a killed agent left the workers training on, unattended: on one node they published a model nobody
    waited for, in a multi-node job they kept the other nodes' collectives going without the lost node's agent.
    SIGTERM first, so the worker unwinds (its MLflow run is marked failed); killed if it is stuck in a collective.
    """
    while not done.wait(AGENT_POLL_S):
        if os.getppid() != agent:  # re-parented: the agent died
            print(f"error: the torchrun agent (pid {agent}) of rank {os.environ.get('RANK', '?')} is gone: stopping "
                  "this worker", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            if not done.wait(ORPHAN_GRACE_S):
                os._exit(137)
            return


@contextlib.contextmanager
def worker_process(timeout_s: float, threads: int = 0, cpu: bool = False) -> Iterator[tuple[DistInfo, torch.device]]:
    """`with worker_process(...) as (info, device):` one worker: joined to the process group (under torchrun), its
    device chosen and set up (`setup_backend`); the group is left on the way out.

    In the main thread SIGTERM unwinds the worker (exit status 143): torchrun stops the surviving workers with it, and
    unwinding runs the `finally`/`with` blocks (an MLflow run is marked failed, not left running). A torchrun worker
    also stops when its agent is gone (`_die_with_agent`). In a job of several nodes every worker first joins
    `node_roster`, so a worker that fails in a collective (a `RuntimeError` from gloo or NCCL) or is stopped by its
    agent (which lost the rendezvous, or another worker) prints an `error:` line naming the node that was lost
    (`lost_peers`).

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
    done = threading.Event()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker, whose parent is its agent
        threading.Thread(target=_die_with_agent, args=(os.getppid(), done), name="die-with-agent",
                         daemon=True).start()
    try:
        info = init_distributed(timeout_s)
        try:
            node = int(os.environ.get("GROUP_RANK", 0))
            roster = node_roster(info) if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1 else []
            device = torch.device("cpu") if cpu else device_for(info)
            setup_backend(device, threads, info.local_world_size)
            try:
                yield info, device
            except (RuntimeError, SystemExit):  # a failed collective, or this node's agent stopping the worker
                lost = lost_peers(roster, node) if roster and info.local_rank == 0 else ""  # one line per node
                if lost:
                    print(f"error: {lost}", file=sys.stderr, flush=True)
                raise
        finally:
            destroy_distributed()
    finally:
        done.set()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
