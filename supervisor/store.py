"""Durable files: atomic writes, state.json, and the single-instance lock.

How it works
- `atomic_write(path, data)`: write a temp file in the same folder, flush + fsync, keep the old file's
  permissions, rename over the target, fsync the folder. A crash at any point leaves either the old or
  the new file, never half of one.
- `move_aside(path, tag)`: rename to `<name>.<tag>-<UTC timestamp>`; the supervisor never deletes
  anything the user (or an earlier run) had.
- `StateStore`: state.json in the state directory. `load()` returns the saved dict, or None when there is
  none; a file that is not our JSON (corrupt, foreign version, another job) is moved aside with a warning.
- `Lock`: an flock on `<state_dir>/lock` held for the daemon's lifetime. The kernel drops it when the
  process dies, even by SIGKILL, so a stale lock never blocks a restart. `status` uses a probe of the same
  lock to tell whether a daemon is running.
"""
from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

STATE_VERSION = 1


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if t is None else t))


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    path = Path(path)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def move_aside(path: Path, tag: str) -> Path:
    path = Path(path)
    dest = path.with_name(f"{path.name}.{tag}-{utc_stamp()}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.{tag}-{utc_stamp()}.{n}")
        n += 1
    os.replace(path, dest)
    return dest


class StateStore:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.path = self.dir / "state.json"

    def read(self) -> dict | None:
        """Read without side effects (for `status`). Raises ValueError on a file that is not ours."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a cardiacseg-train state file (version {data.get('version')!r})"
                             if isinstance(data, dict) else "not a JSON object")
        return data

    def load(self, identity: dict, warn) -> dict | None:
        """The saved state of this job; anything else is moved aside (warn(event, **fields) is told)."""
        try:
            data = self.read()
        except (ValueError, UnicodeDecodeError) as e:
            dest = move_aside(self.path, "corrupt")
            warn("state_moved_aside", path=str(self.path), moved_to=str(dest), why=str(e))
            return None
        if data is None:
            return None
        if data.get("job") != identity:
            dest = move_aside(self.path, "foreign")
            warn("state_moved_aside", path=str(self.path), moved_to=str(dest),
                 why=f"belongs to another job: {data.get('job')}")
            return None
        return data

    def save(self, data: dict) -> None:
        data = {**data, "version": STATE_VERSION, "updated_at": time.time()}
        atomic_write(self.path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode(), 0o644)


class LockedError(Exception):
    def __init__(self, path: Path, holder: str):
        self.path, self.holder = path, holder
        super().__init__(f"another cardiacseg-train supervisor ({holder}) is already running on "
                         f"state directory {path.parent}; stop it first, or give this job its own "
                         f"[paths].state_dir")


class Lock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise LockedError(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def holder(state_dir: Path) -> str | None:
        """Who holds the lock (e.g. "pid 1234"), or None when no supervisor runs."""
        path = Path(state_dir) / "lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
        finally:
            os.close(fd)
        return None
