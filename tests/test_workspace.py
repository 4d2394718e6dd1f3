"""pipelines.workspace.run_streaming: the `dvc repro` it runs (and the stage under it) never outlives the flow."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.workspace import run_streaming

ROOT = Path(__file__).resolve().parents[1]

# A stage: stops cleanly on SIGINT (as the train stage does on Ctrl-C), leaving a mark; prints its and its parent's pid.
STAGE = textwrap.dedent("""
    import os, pathlib, sys, time
    try:
        print("ready", os.getpid(), os.getppid(), flush=True)
        time.sleep(20)
    except KeyboardInterrupt:
        pathlib.Path(sys.argv[1]).write_text("stopped cleanly")
        sys.exit(130)
""")
# `dvc repro` as it runs a stage: starts it, then ignores SIGINT until it ends (dvc/stage/run.py), exits with its code.
DVC = textwrap.dedent(f"""
    import signal, subprocess, sys
    stage = subprocess.Popen([sys.executable, "-c", {STAGE!r}, sys.argv[1]])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(stage.wait())
""")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def kill_all(pids: list[int]) -> None:
    """Only after a failure: what the test started must not outlive it."""
    for pid in filter(alive, pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")


def test_a_sigkilled_caller_takes_dvc_and_its_stage_with_it(tmp_path):
    # The caller is a flow process: it streams the lines on; SIGKILL (Prefect's hard cancel, the OOM killer) runs no
    # handler and no `finally`.
    caller = textwrap.dedent(f"""
        import sys
        from pipelines.workspace import run_streaming
        run_streaming([sys.executable, "-c", {DVC!r}, {str(tmp_path / "mark")!r}], ".",
                      lambda line: print(line, flush=True))
    """)
    flow = subprocess.Popen([sys.executable, "-c", caller], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    pids: list[int] = []
    try:
        words = flow.stdout.readline().split()  # type: ignore[union-attr]
        assert words[:1] == ["ready"], words
        pids = [int(words[1]), int(words[2])]  # the stage, the dvc
        flow.kill()
        flow.wait()
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), [p for p in pids if alive(p)]
        assert not (tmp_path / "mark").exists()  # killed, not stopped: the flow could not ask
    finally:
        kill_all(pids)
        if flow.poll() is None:
            flow.kill()
            flow.wait()


def test_an_interrupted_call_stops_the_stage_under_dvc_as_a_terminals_ctrl_c_would(tmp_path):
    # Ctrl-C in the flow, or Prefect's SIGTERM cancellation, raises in the middle of the streaming: the stage must get
    # SIGINT itself (dvc ignores it while the stage runs), stop cleanly, and nothing of the tree may be left running.
    pids: list[int] = []

    def interrupt_when_ready(line: str) -> None:
        if line.startswith("ready"):
            pids.extend(int(w) for w in line.split()[1:])
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            run_streaming([sys.executable, "-c", DVC, str(tmp_path / "mark")], tmp_path, interrupt_when_ready)
        assert (tmp_path / "mark").read_text() == "stopped cleanly"  # its KeyboardInterrupt handler ran
        assert len(pids) == 2 and not any(alive(p) for p in pids)
    finally:
        kill_all(pids)


def test_output_lines_tail_and_exit_status(tmp_path):
    lines: list[str] = []
    result = run_streaming([sys.executable, "-c", "import sys; print('a'); print(); print('b', file=sys.stderr); "
                            "sys.exit(3)"], tmp_path, lines.append, tail_lines=1)
    assert lines == ["a", "b"] and result.returncode == 3 and result.tail == "b"
