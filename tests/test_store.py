"""Atomic files, moving aside instead of deleting, and the single-instance lock."""
import os
import subprocess
import sys

import pytest

from supervisor.integrations.store import Lock, LockedError, StateStore, atomic_write, move_aside


def test_atomic_write_keeps_mode_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("old")
    os.chmod(p, 0o600)
    atomic_write(p, b"new")
    assert p.read_text() == "new" and (p.stat().st_mode & 0o777) == 0o600
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    p.write_text("old")

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(p, b"new")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_corrupt_and_foreign_state_are_moved_aside(tmp_path):
    s = StateStore(tmp_path)
    warnings = []
    s.path.write_text("{not json")
    assert s.load({"job": 1}, lambda ev, **kw: warnings.append(kw)) is None
    assert not s.path.exists() and len(list(tmp_path.glob("state.json.corrupt-*"))) == 1
    s.save({"job": {"dataset": "A"}})
    assert s.load({"dataset": "B"}, lambda ev, **kw: warnings.append(kw)) is None
    assert len(list(tmp_path.glob("state.json.foreign-*"))) == 1
    assert "another job" in warnings[-1]["why"]
    s.save({"job": {"dataset": "B"}, "x": 1})
    assert s.load({"dataset": "B"}, print)["x"] == 1


def test_move_aside_never_overwrites(tmp_path):
    a = tmp_path / "ck.pth"
    a.write_text("1")
    d1 = move_aside(a, "corrupt")
    a.write_text("2")
    d2 = move_aside(a, "corrupt")
    assert d1 != d2 and d1.read_text() == "1" and d2.read_text() == "2"


def test_lock_is_exclusive_across_processes_and_released_on_death(tmp_path):
    code = ("import sys,time; from supervisor.integrations.store import Lock; l=Lock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    assert Lock.holder(tmp_path) == f"pid {p.pid}"
    with pytest.raises(LockedError, match=f"pid {p.pid}"):
        Lock(tmp_path).acquire()
    p.kill()
    p.wait()
    assert Lock.holder(tmp_path) is None
    Lock(tmp_path).acquire()
