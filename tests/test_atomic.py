"""groupvit.atomic: the one writer of files and folders; crashes are real process deaths (os._exit), not exceptions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from groupvit.atomic import atomic_dir, atomic_write, recover_dir


def die_at_rename(code: str, crash_on_call: int = 1) -> int:
    """Run `code` in a child whose `crash_on_call`-th os.replace kills it first (a crash between write and rename)."""
    prelude = textwrap.dedent(f"""
        import os
        calls = [0]
        real = os.replace
        def replace(a, b):
            calls[0] += 1
            if calls[0] == {crash_on_call}:
                os._exit(9)
            real(a, b)
        os.replace = replace
        from groupvit.atomic import atomic_dir, atomic_write
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)]).returncode


def test_bytes_text_and_a_writer_callable_land_whole(tmp_path):
    atomic_write(tmp_path / "a" / "x.bin", b"\x00\x01")
    atomic_write(tmp_path / "a" / "y.txt", "héllo\n")
    atomic_write(tmp_path / "a" / "z.txt", lambda p: p.write_text("from a writer"))
    assert (tmp_path / "a/x.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a/y.txt").read_text() == "héllo\n"
    assert (tmp_path / "a/z.txt").read_text() == "from a writer"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin", "y.txt", "z.txt"]


def test_the_file_is_fsynced_before_it_is_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "x", "data")
    assert events[:2] == ["fsync", "replace"]


def test_a_crash_between_write_and_rename_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    assert die_at_rename(f"atomic_write({str(target)!r}, 'new')") == 9
    assert target.read_text() == "old"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "metrics.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".metrics.json.tmp")  # the dead writer's, complete
    atomic_write(target, "newer")
    assert target.read_text() == "newer" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failing_writer_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "x"
    target.write_text("old")

    def fails(p: Path) -> None:
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("training failed")
    assert (out / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_crash_inside_the_folder_swap_is_undone_by_the_next_writer(tmp_path):
    out = tmp_path / "shards"
    with atomic_dir(out) as tmp:
        (tmp / "00000.tar").write_text("good")
    # the second os.replace is the one that would move the new folder in: die after the old one moved aside
    code = f"""
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "00000.tar").write_text("new")
    """
    assert die_at_rename(code, crash_on_call=2) == 9
    assert not out.exists()  # the window the crash hit: the old folder is aside, the new one not yet in
    recover_dir(out)
    assert (out / "00000.tar").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["shards"]
    assert die_at_rename(code, crash_on_call=2) == 9
    with atomic_dir(out) as tmp:  # the next writer recovers by itself, then swaps
        assert (out / "00000.tar").read_text() == "good"
        (tmp / "00001.tar").write_text("x")
    assert [p.name for p in out.iterdir()] == ["00001.tar"] and [p.name for p in tmp_path.iterdir()] == ["shards"]
