"""`make serve`'s local Prefect server dies with the process that started it, even when that one is SIGKILLed."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.serve import api_healthy

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> set[int]:
    """The running descendants of `pid` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            parents[int(stat.parent.name)] = int(fields[1])
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, ppid in parents.items() if ppid == parent}
        found |= children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the server's processes in /proc")
def test_local_server_dies_when_its_parent_is_killed_with_sigkill(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    parent_code = textwrap.dedent(f"""
        import time
        from pipelines.serve import start_local_server
        server, api = start_local_server({port})
        print("up", server.pid, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    # Its own process group only so that a failing test can clean up; the kill goes to the parent's pid alone.
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=env, process_group=0)
    tree: set[int] = set()
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]  # start_local_server waits up to 120 s
        assert line.startswith("up"), f"the parent did not start the server; see {tmp_path / 'prefect/server.log'}"
        assert api_healthy(api)
        tree = _tree(parent.pid)
        assert tree
        parent.kill()  # SIGKILL: no handler and no `finally: stop(server)` runs
        parent.wait()
        deadline = time.monotonic() + 20  # the server is SIGKILLed within the watchdog's reaction time
        while (api_healthy(api, timeout=0.5) or any(map(_alive, tree))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not api_healthy(api, timeout=0.5), f"the Prefect server on {api} outlived its parent"
        assert not [p for p in tree if _alive(p)]
    finally:
        for pid in filter(_alive, tree):  # only when the test failed
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
