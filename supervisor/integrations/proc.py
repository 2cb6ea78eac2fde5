"""Start, signal and reap the trainer's whole process group.

How it works
- `spawn` starts the trainer with Popen(argv list, new session => its own process group whose id is
  its pid), stdout/stderr as pipes, and every signal disposition reset to default in the child: a
  daemon started from a non-interactive shell inherits SIGINT=ignored, and a trainer that ignores
  SIGINT cannot be stopped gracefully (../shared/nnunet-facts.md).
- The supervisor makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER, as systemd does), so
  augmentation workers orphaned by a dead trainer are reparented to us rather than to PID 1, stay
  visible, and are reaped here.
- The supervisor's own children (the trainer, the picture, the sensor command, scontrol, probes) are
  started through `popen`/`run`, which register them until their owner has waited for them. Every other
  child of ours is an orphan reparented to us by the subreaper: a process of the trainer's tree (a
  worker, or a daemon that double-forked, called setsid and exec'ed with an empty environment, so that
  neither its group nor the attempt marker finds it). `orphans()` lists them for the attempt to end,
  and `reap_zombies()` collects only them: the exit status of a registered child belongs to its owner.
  The registration happens under a lock that spans the fork, so no child is ever seen unregistered.
- `group_alive(pgid)` asks the kernel (killpg with signal 0) whether any process of the group is left.
- `cgroup_oom_kills()` reads the `oom_kill` counter of our cgroup (v2 memory.events) when there is one,
  as evidence for telling a kernel OOM kill from someone's `kill -9`.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

_RESET_SIGNALS = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                              signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGCHLD,
                              signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGXFSZ)]


def _child_setup() -> None:  # runs in the child between fork and exec
    for s in _RESET_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


_OWN: set[int] = set()        # children the supervisor started and will wait for itself
_OWN_LOCK = threading.Lock()   # held across a fork and while children are listed


def popen(argv, **kw) -> subprocess.Popen:
    """subprocess.Popen for a child the supervisor starts itself: registered as its owner's until
    `release(p)`, which the owner calls once it has waited for it (poll() returned its status)."""
    with _OWN_LOCK:
        p = subprocess.Popen(argv, **kw)
        _OWN.add(p.pid)
    return p


def release(p: subprocess.Popen) -> None:
    with _OWN_LOCK:
        _OWN.discard(p.pid)


def run(argv, *, timeout: float | None = None, input=None, capture_output: bool = False, **kw):
    """subprocess.run through popen/release (the same arguments); TimeoutExpired after killing it."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    p = popen(argv, **kw)
    try:
        with p:
            try:
                out, err = p.communicate(input, timeout=timeout)
            except BaseException:
                p.kill()
                p.communicate()
                raise
    finally:
        release(p)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def orphans() -> list[int]:
    """Live children of ours that we did not start: orphans of the trainer's tree (see the docstring)."""
    with _OWN_LOCK:
        try:
            kids = psutil.Process().children()
        except psutil.Error:
            return []
        return [k.pid for k in kids if k.pid not in _OWN and _alive(k.pid)]


def spawn(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    return popen(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_child_setup, close_fds=True,
    )


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but not ours (pgid reused by another user): not our group
        return False


def reap_zombies(skip: set[int] = frozenset()) -> list[tuple[int, int]]:
    """waitpid() the exited orphans reparented to us; never a child we started (its owner waits for it)
    nor a pid in skip."""
    reaped = []
    with _OWN_LOCK:
        try:
            kids = psutil.Process().children()
        except psutil.Error:
            return reaped
        for k in kids:
            if k.pid in skip or k.pid in _OWN:
                continue
            try:
                if k.status() != psutil.STATUS_ZOMBIE:
                    continue
                pid, status = os.waitpid(k.pid, os.WNOHANG)
                if pid:
                    reaped.append((pid, status))
            except (ChildProcessError, psutil.Error):
                continue
    return reaped


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_pid(pid: int) -> None:
    send(pid, signal.SIGKILL)


def send(pid: int, sig: int) -> bool:
    """Signal one process; False when it is gone or not ours to signal."""
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def same_process(pid: int, create_time: float | None) -> bool:
    """True when pid still names the process we started (pids are reused)."""
    if not pid or create_time is None:
        return False
    t = process_start_time(pid)
    return t is not None and abs(t - create_time) < 0.5


def cgroup_oom_kills(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The kernel's OOM-kill count for our cgroup (v2 memory.events, v1 memory.oom_control), or None."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            candidates.append(Path(root) / rel / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(Path(root) / "memory" / rel / "memory.oom_control")
    for f in candidates:
        try:
            for row in f.read_text().splitlines():
                k, _, v = row.partition(" ")
                if k == "oom_kill":
                    return int(v)
        except (OSError, ValueError):
            continue
    return None


# Every process of an attempt carries this variable (inherited by workers, DDP ranks, and children that
# called setsid), so a supervisor restarted after SIGKILL finds them all, even when the trainer is gone.
ATTEMPT_ENV = "CARDIACSEG_ATTEMPT"


def attempt_marker(state_dir: Path, n: int) -> str:
    return f"{Path(state_dir).resolve()}#{n}"


def marked_processes(state_dir: Path, attempt: int | None = None) -> list[int]:
    """Live processes whose environment names an attempt of this state directory (any attempt, or one)."""
    prefix = f"{Path(state_dir).resolve()}#" if attempt is None else attempt_marker(state_dir, attempt)
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            mark = p.environ().get(ATTEMPT_ENV, "")
            if (mark.startswith(prefix) if attempt is None else mark == prefix):
                found.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return found


def stop_leftovers(pgid: int | None, members: dict, state_dir: Path, grace_s: float, log) -> list[int]:
    """Stop what a killed supervisor left behind: its trainer's group (SIGINT, SIGKILL after grace_s),
    every recorded member still alive (same pid AND start time), and every process carrying our marker.
    Returns the pids that were found. Bounded: grace_s plus a few seconds."""
    targets = {int(pid) for pid, t in (members or {}).items() if same_process(int(pid), t)}
    targets |= set(marked_processes(state_dir))
    alive_group = pgid is not None and group_alive(pgid) and any(
        _pgid(pid) == pgid for pid in targets)  # the group is ours only if a member we know is in it
    if not targets and not alive_group:
        return []
    log.warning("stopping_leftover_trainer", pgid=pgid, pids=sorted(targets))
    if alive_group:
        signal_group(pgid, signal.SIGINT)
        signal_group(pgid, signal.SIGCONT)  # a group paused for heat acts on SIGINT only once continued
    for pid in targets:
        send(pid, signal.SIGINT)
        send(pid, signal.SIGCONT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        reap_zombies()
        time.sleep(0.1)
    if alive_group:
        signal_group(pgid, signal.SIGKILL)
    for pid in targets:
        send(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (any(_alive(p) for p in targets) or (alive_group and group_alive(pgid))):
        reap_zombies()
        time.sleep(0.05)
    return sorted(targets)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def running(pid: int, create_time: float | None) -> bool:
    """`pid` still names that process and it has not exited (a zombie waiting for its parent has)."""
    return same_process(pid, create_time) and _alive(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
