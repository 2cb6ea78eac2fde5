"""A hostile state directory: planted links and special files, a full disk, odd umasks.

Every file the supervisor creates or appends to is opened without following links; a full disk stops the
per-attempt log (said once) and makes StateStore.save raise StateSaveError, never a bare OSError.
"""
import errno
import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from supervisor.core.training_log import MAX_LINE_BYTES
from supervisor.daemon.trainer_output import TRUNCATED, TrainerOutput
from supervisor.integrations.store import (Lock, StateSaveError, StateStore, UnsafePathError, atomic_write,
                              open_append_nofollow, safe_mkdir)

REPO = Path(__file__).parent.parent
VICTIM_TEXT = "root:x:0:0:root:/root:/bin/bash\n"
ROOT = os.geteuid() == 0


@pytest.fixture
def victim(tmp_path):
    """A file outside the state directory that a planted link points at (think /etc/passwd)."""
    v = tmp_path / "elsewhere" / "passwd"
    v.parent.mkdir()
    v.write_text(VICTIM_TEXT)
    return v


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    (d / "attempts").mkdir(parents=True)
    return d


class Warnings(list):
    def __call__(self, event, **fields):
        self.append((event, fields))


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextmanager
def tmpfs(path: Path, size="128k"):
    """A real small tmpfs at `path` (root only), unmounted afterwards whatever happens."""
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# ---- item 2: planted links ----------------------------------------------------------------------------
def test_planted_lock_link_refuses_to_start_and_leaves_its_target_alone(state, victim):
    (state / "lock").symlink_to(victim)
    with pytest.raises(UnsafePathError) as e:
        Lock(state).acquire()
    assert str(state / "lock") in str(e.value) and "symbolic link" in str(e.value)
    assert victim.read_text() == VICTIM_TEXT
    assert Lock.holder(state) is None  # status' probe does not follow it either


def test_hard_linked_or_fifo_lock_is_refused(state, victim):
    os.link(victim, state / "lock")
    with pytest.raises(UnsafePathError, match="2 hard links"):
        Lock(state).acquire()
    assert victim.read_text() == VICTIM_TEXT
    os.unlink(state / "lock")
    os.mkfifo(state / "lock")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        Lock(state).acquire()


def test_run_with_a_planted_lock_link_exits_2_naming_the_path(job, victim):
    cfg = job.config()
    job.state.mkdir()
    (job.state / "lock").symlink_to(victim)
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert str(job.state / "lock") in r.stderr and "Traceback" not in r.stderr
    assert victim.read_text() == VICTIM_TEXT
    assert not (job.state / "attempts").exists() or not list((job.state / "attempts").iterdir())


def test_planted_log_link_is_moved_aside_and_replaced_by_a_regular_file(state, victim):
    log = state / "attempts" / "attempt-0001.log"
    log.symlink_to(victim)
    w = Warnings()
    out = TrainerOutput(log, warn=w, reserve_bytes=0)
    assert out.feed("stdout", b"Epoch 0\n") == [("stdout", "Epoch 0")]
    out.close()
    assert victim.read_text() == VICTIM_TEXT
    assert not log.is_symlink() and log.read_bytes() == b"Epoch 0\n"
    [aside] = [p for p in log.parent.iterdir() if p.name.startswith("attempt-0001.log.unsafe-")]
    assert aside.is_symlink() and os.readlink(aside) == str(victim)  # the link itself is kept
    assert [e for e, _ in w] == ["attempt_log_moved_aside"] and w[0][1]["moved_to"] == str(aside)


def test_planted_fifo_log_does_not_hang_and_is_moved_aside(state):
    log = state / "attempts" / "attempt-0002.log"
    os.mkfifo(log)
    fd, moved = open_append_nofollow(log)
    os.close(fd)
    assert moved is not None and stat.S_ISFIFO(os.lstat(moved).st_mode) and log.is_file()


def test_attempts_folder_planted_as_a_link_is_refused_and_never_written_through(state, victim):
    os.rmdir(state / "attempts")
    (state / "attempts").symlink_to(victim.parent)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        safe_mkdir(state / "attempts")
    w = Warnings()
    out = TrainerOutput(state / "attempts" / "passwd", warn=w)  # even if the daemon went on
    out.feed("stdout", b"pwned\n")
    assert victim.read_text() == VICTIM_TEXT and [e for e, _ in w] == ["attempt_log_stopped"]


def test_a_configured_state_dir_that_is_a_link_is_the_admins_choice(tmp_path):
    real = tmp_path / "disk" / "state"
    real.mkdir(parents=True)
    (tmp_path / "state").symlink_to(real)
    assert safe_mkdir(tmp_path / "state", follow_symlink=True) == tmp_path / "state"
    Lock(tmp_path / "state").acquire()
    assert (real / "lock").is_file()


def test_state_json_link_is_replaced_not_followed_and_moved_aside_on_load(state, victim):
    store = StateStore(state)
    store.path.symlink_to(victim)
    w = Warnings()
    assert store.load({"dataset": "A"}, w) is None  # never read through the link
    assert w[0][0] == "state_moved_aside" and "symbolic link" in w[0][1]["why"]
    assert os.path.islink(w[0][1]["moved_to"])
    store.path.symlink_to(victim)
    store.save({"job": {"dataset": "A"}})  # a link planted later: the rename replaces it
    assert victim.read_text() == VICTIM_TEXT and store.path.is_file() and not store.path.is_symlink()
    os.replace(store.path, state / "x")
    store.path.symlink_to(state / "x")
    with pytest.raises(ValueError, match="symbolic link"):  # status' side-effect-free read
        store.read()


def test_thermal_json_written_by_atomic_write_replaces_a_planted_link(state, victim):
    (state / "thermal.json").symlink_to(victim)
    atomic_write(state / "thermal.json", b"{}")
    assert victim.read_text() == VICTIM_TEXT and (state / "thermal.json").read_text() == "{}"
    assert mode(state / "thermal.json") == 0o644 & ~os.umask(os.umask(0))


# ---- item 4: a full state directory -------------------------------------------------------------------
def test_full_disk_stops_the_attempt_log_once_and_keeps_forwarding(tmp_path):
    with tmpfs(tmp_path / "small") as d:
        w = Warnings()
        out = TrainerOutput(d / "attempt-0001.log", warn=w, reserve_bytes=0)
        long_line = b"x" * (512 * 1024) + b"\n"
        # forwarded cut at MAX_LINE_BYTES (the attempt log would have it all, had the disk room)
        assert out.feed("stdout", long_line) == [("stdout", "x" * MAX_LINE_BYTES + TRUNCATED.decode())]
        assert out.feed("stderr", b"Traceback (most recent call last):\n  f()\nOSError: boom\n") == [
            ("stderr", "Traceback (most recent call last):\n  f()\nOSError: boom")]
        assert [e for e, _ in w] == ["attempt_log_stopped"]  # said once
        assert "No space left on device" in w[0][1]["why"] and out.log_error == w[0][1]["why"]
        assert "OSError: boom" in out.evidence()
        out.close()


def test_full_disk_makes_state_save_raise_state_save_error_and_keeps_the_old_state(tmp_path):
    with tmpfs(tmp_path / "small") as d:
        store = StateStore(d)
        store.save({"job": {"dataset": "A"}, "n": 1})
        with pytest.raises(StateSaveError) as e:
            store.save({"job": {"dataset": "A"}, "n": 2, "pad": "y" * (256 * 1024)})
        assert e.value.errno == errno.ENOSPC and str(d / "state.json") in str(e.value)
        assert json.loads(store.path.read_text())["n"] == 1
        assert sorted(os.listdir(d)) == ["state.json"]  # no temp file left behind


def test_when_space_is_short_the_attempt_log_goes_first(tmp_path):
    with tmpfs(tmp_path / "small") as d:
        w = Warnings()
        out = TrainerOutput(d / "attempt-0001.log", warn=w)  # default reserve: more than the disk
        for _ in range(20):
            out.feed("stdout", b"y" * 8000 + b"\n")
        out.close()
        assert [e for e, _ in w] == ["attempt_log_stopped"] and "kept free" in w[0][1]["why"]
        StateStore(d).save({"job": {"dataset": "A"}, "pad": "z" * (64 * 1024)})  # still fits


def test_write_errors_other_than_enospc_also_degrade(tmp_path):
    # EFBIG from RLIMIT_FSIZE: a real write error without root, in a child so the limit stays there.
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(REPO)!r})
from supervisor.daemon.trainer_output import TrainerOutput
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
seen = []
out = TrainerOutput(sys.argv[1], warn=lambda e, **f: seen.append((e, f["why"])), reserve_bytes=0)
lines = out.feed("stdout", b"a" * 10000 + b"\\nnext\\n") + out.feed("stdout", b"more\\n")
print(len(lines), seen)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.log")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("3 [('attempt_log_stopped', 'File too large')]"), r.stdout


# ---- item 11: modes follow the umask, never group- or world-writable -----------------------------------
@pytest.mark.parametrize("mask,fmode,dmode", [(0o000, 0o644, 0o755), (0o022, 0o644, 0o755),
                                             (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)])
def test_created_files_follow_the_umask_and_are_never_group_or_world_writable(tmp_path, mask, fmode, dmode):
    sd = tmp_path / "var" / "lib" / "state"
    with umask(mask):
        safe_mkdir(sd, follow_symlink=True)
        safe_mkdir(sd / "attempts")
        StateStore(sd).save({"job": {}})
        lock = Lock(sd)
        lock.acquire()
        lock.release()
        TrainerOutput(sd / "attempts" / "attempt-0001.log").close()
        atomic_write(sd / "thermal.json", b"{}")
    for d in (tmp_path / "var", tmp_path / "var" / "lib", sd, sd / "attempts"):
        assert mode(d) == dmode, d
    for f in ("state.json", "lock", "attempts/attempt-0001.log", "thermal.json"):
        assert mode(sd / f) == fmode, f


def test_an_existing_state_file_keeps_its_mode(tmp_path):
    store = StateStore(tmp_path)
    store.save({"job": {}})
    os.chmod(store.path, 0o600)
    with umask(0o000):
        store.save({"job": {}, "n": 2})
    assert mode(store.path) == 0o600


def test_supervisor_with_its_state_dir_on_a_full_tmpfs_keeps_supervising(job):
    # The reported scenario: state_dir on a 128 KiB tmpfs and one trainer line longer than that.
    from conftest import FAKE
    shout = (f"import runpy, sys; print('x' * 300000, flush=True); sys.argv = [{str(FAKE)!r}, *sys.argv[1:]]; "
             f"runpy.run_path({str(FAKE)!r}, run_name='__main__')")
    cfg = job.config(env={"FAKE_EPOCHS": "2"}, training={"command": [sys.executable, "-c", shout]})
    with tmpfs(job.state):
        rc, out = job.run(cfg, timeout=120)
        assert rc == 0, out[-3000:]
        assert "Traceback" not in out and "No space left" not in out
        assert job.state_json()["sup"]["state"] == "done" and len(job.state_json()["epochs"]) == 2
        assert os.path.getsize(job.state / "attempts" / "attempt-0001.log") == 0  # the log went first
