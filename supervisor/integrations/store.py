"""Durable files: atomic writes, state.json, the single-instance lock, and files that never follow links.

How it works
- `atomic_write(path, data)`: write a temp file in the same folder (created O_EXCL | O_NOFOLLOW under a
  random name), flush + fsync, give it the old file's mode, owner and group, rename over the target,
  fsync the folder. A crash at any point leaves either the old or the new file, never half of one. The
  rename replaces a symlink at `path` itself and never writes through it; `follow_symlink=True` (the
  user's own plans file) writes to the link's target instead, atomically in the target's folder.
- Modes: everything the supervisor creates follows the umask and is never group- or world-writable
  (files at most 0644, folders at most 0755; under the unit's UMask=0027, 0640 and 0750). An existing
  file keeps its mode, owner and group.
- Links inside the state directory: a configured `state_dir` that is itself a symlink is the admin's
  choice and is followed; a symlink (or a hard link, a FIFO...) planted INSIDE it is not. The lock and
  the `attempts/` folder refuse to start (`UnsafePathError`, a ConfigError: exit 2); state.json is moved
  aside on load; a per-attempt log is moved aside and replaced by a regular file
  (`open_append_nofollow`). `safe_mkdir` and `open_append_nofollow` are what the daemon calls.
- `move_aside(path, tag)`: rename to `<name>.<tag>-<UTC timestamp>`; the supervisor never deletes
  anything the user (or an earlier run) had.
- `StateStore`: state.json in the state directory. `read()` returns the saved dict (with its "epochs"
  read from epochs.jsonl, see epoch_log.py), or None when there is none; `load()` likewise for the
  daemon (without the epochs: it replays the logs), and a file that is not our JSON (corrupt, foreign
  version, another job, a link) is moved aside with a warning. `save()` raises `StateSaveError` (never a bare OSError) when the file cannot be written, e.g.
  a full disk; the previous state.json is then intact and the caller keeps supervising.
- `Lock`: an flock on `<state_dir>/lock` held for the daemon's lifetime. The kernel drops it when the
  process dies, even by SIGKILL, so a stale lock never blocks a restart. `status` uses a probe of the same
  lock to tell whether a daemon is running.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from pathlib import Path

from supervisor.config.loader import ConfigError

STATE_VERSION = 1
FILE_MODE = 0o644  # before the umask: never group- or world-writable, whatever the umask says
DIR_MODE = 0o755
NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO must not hang open()


class UnsafePathError(ConfigError):
    """A file or folder of the state directory is a symlink or otherwise not what the supervisor made.

    A ConfigError, so `run` reports it without a traceback and exits 2 (a folder that cannot be used)."""

    def __init__(self, path: Path | str, why: str):
        self.path, self.problems = str(path), [why]
        Exception.__init__(self, f"refusing to use {path}: {why}")


class StateSaveError(Exception):
    """state.json could not be written (disk full, quota, I/O error, read-only); the old file is intact.

    `.errno` is the OSError's errno (errno.ENOSPC, errno.EDQUOT, ...), `.path` the state file."""

    def __init__(self, path: Path, err: OSError):
        self.path, self.errno, self.strerror = Path(path), err.errno, err.strerror or str(err)
        super().__init__(f"cannot write {path}: {self.strerror}")


def utc_stamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if t is None else t))


def _describe(st: os.stat_result, path: Path) -> str:
    if stat.S_ISLNK(st.st_mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return f"a regular file with {st.st_nlink} hard links"


def keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    """Give a replacement the old file's owner, group and mode (owner first: chown clears setuid bits)."""
    if (old.st_uid, old.st_gid) != (os.fstat(fd).st_uid, os.fstat(fd).st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            pass  # not root and not our file: the rename makes it ours; nothing better is possible
    os.fchmod(fd, stat.S_IMODE(old.st_mode))


def temp_beside(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty temp file in `folder`: O_EXCL | O_NOFOLLOW, mode FILE_MODE minus the umask."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, FILE_MODE), tmp
        except FileExistsError:
            continue


def fsync_dir(folder: Path) -> None:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path, data: bytes, mode: int | None = None, *, follow_symlink: bool = False,
                 durable: bool = True) -> Path:
    """Replace `path` by `data` atomically; returns the file actually written (the link's target when
    `follow_symlink`). `mode` None: an existing regular file's mode, owner and group are kept, a new file
    gets FILE_MODE minus the umask. `durable=False` skips the fsyncs: readers still see the old or the new
    file, but a crash of the machine may leave either (for files rewritten every few seconds)."""
    path = Path(path)
    if follow_symlink:
        path = Path(os.path.realpath(path))
    try:
        old = os.lstat(path)
        old = old if stat.S_ISREG(old.st_mode) else None  # a link or other object is replaced, not read
    except FileNotFoundError:
        old = None
    fd, tmp = temp_beside(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            if old is not None and mode is None:
                keep_owner_and_mode(fh.fileno(), old)
            elif mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def move_aside(path: Path, tag: str) -> Path:
    path = Path(path)
    dest = path.with_name(f"{path.name}.{tag}-{utc_stamp()}")
    n = 1
    while os.path.lexists(dest):
        dest = path.with_name(f"{path.name}.{tag}-{utc_stamp()}.{n}")
        n += 1
    os.replace(path, dest)
    return dest


def safe_mkdir(path: Path, *, follow_symlink: bool = False) -> Path:
    """Create the folder `path` (and missing parents, each DIR_MODE minus the umask, never group- or
    world-writable); an existing folder is left as it is. With follow_symlink=False (`attempts/`) an
    existing symlink or non-folder raises UnsafePathError; True (the configured state_dir) accepts a
    symlink to a folder, the admin's choice."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)  # os.makedirs would give the parents 0777 minus the umask
        except FileExistsError:
            pass  # created meanwhile: checked below like any existing one
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) and follow_symlink:
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(path, f"it is {_describe(os.lstat(path), path)}, expected a folder the "
                                    "supervisor created; move it away and start again")
    return path


def open_append_nofollow(path: Path) -> tuple[int, Path | None]:
    """Open (creating it) `path` for appending, never through a link: returns (fd, moved_to).

    The parent folder is opened O_NOFOLLOW too and the file by openat, so neither a planted
    `attempts -> /etc` nor `attempt-0001.log -> /etc/passwd` is written through. Anything at `path`
    that is not a regular file with one link is moved aside (moved_to says where) and a new file made."""
    path = Path(path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW)
    try:
        moved = None
        for _ in range(3):
            try:
                fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, FILE_MODE,
                             dir_fd=dfd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise
            else:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.set_blocking(fd, True)
                    return fd, moved
                os.close(fd)
            moved = move_aside(path, "unsafe")
        raise UnsafePathError(path, "keeps being replaced by a link or special file")
    finally:
        os.close(dfd)


class StateStore:
    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir)
        self.path = self.dir / "state.json"

    def read(self, epochs: bool = True) -> dict | None:
        """Read without side effects (for `status`). Raises ValueError on a file that is not ours (a link
        or special file included: it is never followed)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError("a symbolic link, which the supervisor never writes") from None
            raise
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            raw = fh.read()
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"not a cardiacseg-train state file (version {data.get('version')!r})"
                             if isinstance(data, dict) else "not a JSON object")
        if epochs and data.get("epochs_file"):
            from supervisor.integrations import epoch_log  # it builds on this module

            data["epochs"] = epoch_log.read(self.dir) or []
        return data

    def load(self, identity: dict, warn) -> dict | None:
        """The saved state of this job; anything else is moved aside (warn(event, **fields) is told)."""
        try:
            data = self.read(epochs=False)
        except (ValueError, UnicodeDecodeError) as e:
            dest = move_aside(self.path, "unsafe" if os.path.islink(self.path) else "corrupt")
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
        """Write state.json atomically. Raises StateSaveError when it cannot (disk full: ENOSPC, EDQUOT,
        EIO, EROFS, ...); the previous state.json is then unchanged and no temp file is left."""
        data = {**data, "version": STATE_VERSION, "updated_at": time.time()}
        # no indent: only then does json use its C encoder (saved after every epoch, for days)
        text = (json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            atomic_write(self.path, text)
        except OSError as e:
            raise StateSaveError(self.path, e) from None


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
        """Take the lock or raise LockedError; a lock that is a link, a folder or a hard-linked file raises
        UnsafePathError (never opened through, never truncated)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW, FILE_MODE)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise UnsafePathError(self.path, f"it is {_describe(os.lstat(self.path), self.path)}, "
                                      "not the supervisor's lock file; remove it and start again") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise UnsafePathError(self.path, f"it is {_describe(st, self.path)}, not the supervisor's "
                                  "lock file; remove it and start again")
        os.set_blocking(fd, True)
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
            fd = os.open(path, os.O_RDONLY | NOFOLLOW)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
        finally:
            os.close(fd)
        return None
