"""Atomic files and folders: a reader sees the old version or the new one, never a part, whatever kills the writer.

    atomic_write(path, data)        bytes, str, or a callable that writes a given temporary path
    with atomic_dir(path) as tmp:   fill the folder `tmp`; on success it replaces `path`, on an error `path` is kept

Every write goes to a temporary name beside its target (same file system, so the rename is atomic), is fsynced, and
is renamed over the target; the parent folder is fsynced after the rename so the new name survives a power loss.
Temporary names carry the writer's pid (`.<name>.tmp<pid>`): a writer killed between the write and the rename leaves
one behind, and the next write of the same target removes those whose process is gone, so a stale temporary never
ends up in a DVC output hash.

A folder cannot be swapped in one system call without `renameat2(RENAME_EXCHANGE)`, so `atomic_dir` moves the old
folder aside to `.<name>.old<pid>`, renames the new one in and then deletes the old one. A crash between the two
renames leaves no `path` but a complete old folder beside it: the next `atomic_dir` (or `recover_dir`) of that path
puts it back before doing anything else.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

Data = bytes | str | Callable[[Path], None]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: Path, kind: str) -> list[Path]:
    """Temporaries of `path` (`.<name>.<kind><pid>`) left by writers that no longer run."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{kind}(\d+)$")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir()
            if (m := pattern.match(p.name)) and not _pid_alive(int(m.group(1)))]


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(folder: Path) -> None:
    """Flush every file below `folder` to disk: one system-wide sync where there is one, else file by file."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike[str], data: Data) -> Path:
    """Write `data` to `path` atomically; the parent folders are created. Returns `path`.

    Args:
        path: the target file.
        data: bytes, text (UTF-8), or `write(tmp_path)` for writers that want a path (torch.save, pyarrow, PIL).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in _stale(path, "tmp"):
        _remove(old)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def recover_dir(path: str | os.PathLike[str]) -> None:
    """Undo a folder swap interrupted between its two renames: put the old folder back when `path` is missing."""
    path = Path(path)
    olds = _stale(path, "old")
    if not path.exists() and olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.replace(newest, path)
        olds.remove(newest)
    for old in olds + _stale(path, "new"):
        _remove(old)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in for `path` when the block succeeds.

    On an exception the temporary folder is deleted and `path` is untouched. The new folder's data reaches the disk
    before the swap (one `os.sync()`: fsyncing each of the synthetic world's 41,000 files one by one cost 90 s), so the
    swapped-in folder is complete after a power loss too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = path.with_name(f".{path.name}.new{os.getpid()}")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _sync_tree(tmp)
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        _remove(old)
    finally:
        _remove(tmp)
