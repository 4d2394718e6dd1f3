"""Child process trees that die with the process that started them, even when it is killed with SIGKILL.

`TiedProcess(cmd)` runs `cmd` under a small watchdog (this file run as a script: `python -P procs.py <parent pid>
<lifeline fd> <cmd...>`, which needs neither the package on the path nor anything outside the standard library):

* the watchdog leads a new session, and `cmd` with everything it spawns (img2dataset's pool workers, a server's
  workers) stays in the watchdog's process group, so one `killpg` reaches the whole tree;
* it holds the read end of a pipe whose write end only the parent holds: when the parent is gone (SIGKILL, OOM
  kill, crash) the pipe reads end-of-file at once and the watchdog SIGKILLs the whole group (it also polls its parent
  pid, in case a forked copy of the parent keeps the pipe open). A parent-death signal (prctl) would not do: it is
  not inherited by grandchildren, and it fires when the *thread* that started the child exits;
* SIGINT, SIGTERM and SIGHUP sent to it are forwarded to `cmd` only, so a command's own clean shutdown (img2dataset's
  SIGINT handler, uvicorn's SIGTERM handler) runs once; when `cmd` exits the parent kills what it left behind.

The tree is in its own session, so a terminal's Ctrl-C and Ctrl-Z reach only the parent: the parent stops the tree
on Ctrl-C (its own KeyboardInterrupt handling calls `stop`), and `TiedProcess` forwards Ctrl-Z (SIGTSTP) and the
following SIGCONT when it was created in the main thread.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

POLL_S = 0.1  # how often the watchdog looks at its command and its parent's pid (the lifeline pipe wakes it at once)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TiedProcess:
    """`cmd` in a new session under a watchdog that kills the session's process group when this process dies.

    Args:
        cmd: the command line.
        **popen_kwargs: passed to `subprocess.Popen` (stdout, stderr, env, cwd, ...); not `start_new_session`.
            stdin defaults to /dev/null: the tree is not in the terminal's session.

    Attributes:
        pid: the watchdog's pid, which is also the process group id of the whole tree.
        stdout, stderr: as `Popen`'s (pipes when asked for with `subprocess.PIPE`).
        returncode: `cmd`'s exit status once it has ended (negative: killed by that signal), else None.
    """

    def __init__(self, cmd: Sequence[str], **popen_kwargs: Any) -> None:
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        read_end, self._lifeline = os.pipe()  # both close-on-exec: no other child inherits the write end
        try:
            # -P: the script's folder (groupvit/) is not put on sys.path, where its modules could shadow the stdlib's
            self._proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), str(os.getpid()),
                                           str(read_end), *cmd], start_new_session=True, pass_fds=(read_end,),
                                          **popen_kwargs)
        except BaseException:
            os.close(self._lifeline)
            raise
        finally:
            os.close(read_end)
        self.pid = self._proc.pid
        self.stdout, self.stderr = self._proc.stdout, self._proc.stderr
        self.returncode: int | None = None
        self._previous_tstp: Any = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTSTP") \
                and signal.getsignal(signal.SIGTSTP) == signal.SIG_DFL:
            self._previous_tstp = signal.signal(signal.SIGTSTP, self._suspend)

    def _suspend(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-Z: stop the tree too (it is not in the terminal's foreground group), stop, and resume it after."""
        self._killpg(signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # the default action stops this process here, until SIGCONT
        signal.signal(signal.SIGTSTP, self._suspend)
        self._killpg(signal.SIGCONT)

    def _killpg(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _exited(self) -> bool:
        """Whether the watchdog has exited, without reaping it: its zombie keeps the group id from being reused."""
        if not hasattr(os, "waitid"):  # no WNOWAIT here (macOS): reap; a freed group id is rarely reused at once
            return self._proc.poll() is not None
        return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None

    def _reap(self) -> int:
        self._killpg(signal.SIGKILL)  # whatever `cmd` left behind in its group (orphaned workers)
        rc = self._proc.wait()
        os.close(self._lifeline)
        if self._previous_tstp is not None and signal.getsignal(signal.SIGTSTP) == self._suspend:
            signal.signal(signal.SIGTSTP, self._previous_tstp)
        self._previous_tstp = None
        self.returncode = rc
        return rc

    def poll(self) -> int | None:
        """`cmd`'s exit status if the tree has ended (then also reaped and cleaned up), else None."""
        if self.returncode is None and self._exited():
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for `cmd` to end, then kill anything it left in its group; returns its exit status.

        Raises:
            subprocess.TimeoutExpired: `timeout` seconds passed first (the tree is left running).
        """
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        # Short sleeps, not one blocking wait: with the image server's threads running, a blocking wait was seen to
        # hold the stage's SIGTERM/SIGHUP handler back until img2dataset had finished (the signal, it seems, went to
        # another thread); this way Python runs the handler within 50 ms.
        while not self._exited():
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self._proc.args, timeout)  # type: ignore[arg-type]
            time.sleep(0.05)
        return self._reap()

    def send_signal(self, sig: int) -> None:
        """Send `sig` to `cmd` (through the watchdog, which forwards SIGINT, SIGTERM and SIGHUP)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL the whole tree at once and reap it."""
        self._killpg(signal.SIGKILL)
        return self.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Ask `cmd` to stop with `sig`, then kill the whole tree if it has not ended within `timeout` seconds."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()
        except BaseException:  # a second Ctrl-C while waiting: no more patience
            self.kill()
            raise

    def __enter__(self) -> TiedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.poll() is None:
            self.kill()


def _watch(parent: int, lifeline: int, cmd: list[str]) -> int:
    """The watchdog: run `cmd`, forward stop signals to it, kill the group when `parent` is gone.

    Args:
        parent: the parent's pid.
        lifeline: read end of a pipe that only the parent writes to (never, in fact): EOF = the parent is gone.
    """
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if child is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    if os.getppid() != parent:  # the parent died before we got here
        os.killpg(0, signal.SIGKILL)
    child = subprocess.Popen(cmd)
    for sig in pending:
        child.send_signal(sig)
    while child.poll() is None:
        gone, _, _ = select.select([lifeline], [], [], POLL_S)
        if gone or os.getppid() != parent:  # EOF, or re-parented: the parent is gone, and so is all it started
            os.killpg(0, signal.SIGKILL)
    if child.returncode < 0:  # die of the same signal, so the parent sees what a direct child would report
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler to reset
            signal.signal(-child.returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -child.returncode)
        return 128 - child.returncode  # a signal this process ignores (SIGPIPE in Python)
    return child.returncode


if __name__ == "__main__":
    sys.exit(_watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
