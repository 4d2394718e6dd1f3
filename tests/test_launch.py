"""`pipelines.launch`: torchrun workers started with the launch options, signals passed on to them, exit statuses
returned, and the per-worker set-up (threads, SIGTERM unwinding) shared by the train stage and the benchmark."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pipelines.launch import LaunchOptions, launch, resolve_nproc, worker_process

ROOT = Path(__file__).resolve().parents[1]

# A child that reports it is ready, then waits for a signal and exits with 10 + its number.
CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda n, _f: (out.write_text(str(n)), sys.exit(10 + n)))
    out.write_text("ready")
    time.sleep(60)
""")
PARENT = textwrap.dedent("""
    import sys
    from pipelines.launch import run_forwarding_signals
    sys.exit(run_forwarding_signals([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
""")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_the_launcher_passes_termination_signals_on_and_returns_the_exit_status(tmp_path, sig):
    report = tmp_path / "child.txt"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(report)], env=env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (report.exists() and report.read_text() == "ready") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert report.read_text() == "ready"
        parent.send_signal(sig)  # to the launcher only, as DVC/Prefect cancel it
        assert parent.wait(timeout=60) == 10 + sig  # the child's status, not a launcher killed by the signal
        assert report.read_text() == str(int(sig))
    finally:
        parent.kill()
        parent.wait()


def test_a_killed_launcher_takes_its_workers_with_it(tmp_path):
    """kill -9 of `groupvit train` left torchrun and its workers training on (and publishing a model) unattended."""
    report = tmp_path / "child.txt"
    pid_file = tmp_path / "child.pid"
    write_pid = f'Path({str(pid_file)!r}).write_text(str(__import__("os").getpid())); '
    child = CHILD.replace('out.write_text("ready")', write_pid + 'out.write_text("ready")')
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child, str(report)], env=env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (report.exists() and report.read_text() == "ready") and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.05)
        assert not _alive(worker), "the launched process outlived its launcher"
    finally:
        parent.kill()
        parent.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped by init) counts as gone
        return f.read().split(") ")[-1][0] != "Z"


def test_torchrun_runs_the_workers_with_the_options_and_reports_their_failure(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        rank = os.environ["RANK"]
        Path({str(tmp_path)!r}, "rank" + rank).write_text(os.environ["WORLD_SIZE"] + " " + " ".join(sys.argv[1:]))
        sys.exit(3 if "--fail" in sys.argv and rank == "1" else 0)
    """))
    assert launch(LaunchOptions(nproc=2), [str(script), "--ok"], env=env(), cwd=str(tmp_path)) == 0
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "2 --ok"
    with open(tmp_path / "torchrun.log", "w+") as log:  # torchrun's report of the failed worker goes here
        assert launch(LaunchOptions(nproc=2), [str(script), "--fail"], env=env(), cwd=str(tmp_path), output=log) != 0
    assert "worker.py FAILED" in (tmp_path / "torchrun.log").read_text()


def test_nproc_auto_is_one_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_nproc("auto") == 1 and resolve_nproc(3) == 3 and resolve_nproc("2") == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # no GPU here: what torch would count on a 4-GPU host
    assert resolve_nproc("auto") == 4


def test_a_worker_shares_the_cores_between_the_processes_of_its_machine(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 processes on this machine: 2 of the 8 cores each
    try:
        with worker_process(60, cpu=True) as (info, device):
            assert device.type == "cpu" and info.local_world_size == 4 and torch.get_num_threads() == 2
        with worker_process(60, threads=1, cpu=True):
            assert torch.get_num_threads() == 1  # train.threads wins
    finally:
        torch.set_num_threads(before)


def test_sigterm_unwinds_a_worker_through_its_finally_blocks(tmp_path):
    """torchrun stops the surviving workers with SIGTERM: they must unwind (an MLflow run is then marked failed)."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from pipelines.launch import worker_process
        before = signal.getsignal(signal.SIGTERM)
        try:
            with worker_process(60, threads=1, cpu=True):
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(30)
                finally:
                    print("unwound", flush=True)
        finally:
            print("handler restored" if signal.getsignal(signal.SIGTERM) is before else "handler kept", flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env(), cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 143, out.stderr
    assert out.stdout.split() == ["unwound", "handler", "restored"]
