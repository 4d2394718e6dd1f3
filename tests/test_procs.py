"""TiedProcess: a child's whole tree dies with its parent (SIGKILL included); clean stops still reach the child."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from groupvit.procs import TiedProcess

ROOT = Path(__file__).resolve().parents[1]

# A child that starts a grandchild (as img2dataset starts its pool workers), reports both pids, and waits.
TREE = textwrap.dedent("""
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("tree", __import__("os").getpid(), grandchild.pid, flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _parent(script: str) -> subprocess.Popen[str]:
    """A parent process that starts TREE as a TiedProcess (its stdout is ours) and prints the watchdog pid."""
    code = textwrap.dedent(f"""
        import sys, time
        from groupvit.procs import TiedProcess
        tree = TiedProcess([sys.executable, "-c", {TREE!r}])
        print("watchdog", tree.pid, flush=True)
        {script}
    """)
    # Its own process group, in our session: a group outside any session's job control ("orphaned") ignores SIGTSTP.
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), process_group=0)


def _pids(parent: subprocess.Popen[str]) -> list[int]:
    """watchdog, child, grandchild."""
    lines = {}
    while len(lines) < 2:
        words = parent.stdout.readline().split()  # type: ignore[union-attr]
        assert words, "the parent ended early"
        lines[words[0]] = [int(w) for w in words[1:]]
    return lines["watchdog"] + lines["tree"]


def test_the_whole_tree_dies_when_the_parent_is_killed_with_sigkill():
    parent, pids = _parent("time.sleep(120)"), []
    try:
        pids = _pids(parent)
        assert all(alive(p) for p in pids)
        parent.kill()  # SIGKILL to the parent alone: no handler, no finally runs
        parent.wait()
        assert wait_until(lambda: not any(alive(p) for p in pids), 5), [p for p in pids if alive(p)]
    finally:
        for p in filter(alive, pids):  # only after a failure
            os.kill(p, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_stop_forwards_the_signal_once_and_kills_what_the_child_leaves_behind(tmp_path):
    # The child handles SIGTERM cleanly (counts it, exits 3) but leaves a grandchild that ignores SIGTERM.
    log = tmp_path / "signals"
    child = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        keep = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        print(keep.pid, flush=True)
        def on_term(*_):
            open({str(log)!r}, "a").write("TERM\\n")
            sys.exit(3)
        signal.signal(signal.SIGTERM, on_term)
        time.sleep(120)
    """)
    proc = TiedProcess([sys.executable, "-c", child], stdout=subprocess.PIPE)
    grandchild = int(proc.stdout.readline())  # type: ignore[union-attr]
    assert proc.poll() is None and alive(grandchild)
    assert proc.stop(signal.SIGTERM, timeout=30) == 3
    assert log.read_text() == "TERM\n"  # the child's own clean shutdown ran, once
    assert wait_until(lambda: not alive(grandchild), 5)
    assert not alive(proc.pid)


def test_exit_status_is_the_childs():
    assert TiedProcess([sys.executable, "-c", "import sys; sys.exit(7)"]).wait() == 7
    killed = TiedProcess([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.wait(timeout=30) == -signal.SIGKILL
    slow = TiedProcess([sys.executable, "-c", "import time; time.sleep(120)"])
    with pytest.raises(subprocess.TimeoutExpired):
        slow.wait(timeout=0.2)
    assert slow.kill() == -signal.SIGKILL


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_ctrl_z_stops_and_resumes_the_tree_with_the_parent():
    # The tree is in its own session, so the terminal's SIGTSTP reaches only the parent, which forwards it.
    parent = _parent("time.sleep(120)")
    try:
        pids = _pids(parent)
        os.kill(parent.pid, signal.SIGTSTP)
        assert wait_until(lambda: state(parent.pid) == "T" and all(state(p) == "T" for p in pids[1:]), 10)
        os.kill(parent.pid, signal.SIGCONT)
        assert wait_until(lambda: state(parent.pid) != "T" and all(state(p) != "T" for p in pids[1:]), 10)
    finally:
        parent.kill()  # and the tree with it
        parent.wait()
