"""One running training attempt: its process, output, every process of it, and how busy they are.

How it works: the trainer leads its own process group (start_new_session), so pgid == pid. Every few
seconds `sample()` records the trainer's descendants (pid + start time, so a reused pid is never
mistaken for ours, and a worker that left the group with setsid is still known) and the CPU seconds the
whole tree has used; `cpu_share()` gives the cores the tree used since the
previous sample, and `stalled()` applies the hang rule: no epoch for longer than the limit, an idle tree
and, where NVML tells, an idle GPU (a deadlock, a dead NFS mount). `survivors()` lists processes of
the attempt that are still alive after the trainer itself exited.
"""
from __future__ import annotations

import psutil

from . import proc
from .events import Stalled
from .output import TrainerOutput
from .policy import hang_limit

SAMPLE_S = 5.0


class Attempt:
    def __init__(self, n: int, popen, output: TrainerOutput, now: float):
        self.n, self.popen, self.output = n, popen, output
        self.pid = self.pgid = popen.pid
        self.started = now
        self.open_streams = 2
        self.returncode: int | None = None
        self.reap_deadline: float | None = None
        self.gpu_deadline: float | None = None
        self.known: dict[int, float | None] = {self.pid: proc.process_start_time(self.pid)}
        self.oom_kills_at_start = proc.cgroup_oom_kills()
        self.next_sample = 0.0
        self.cpu: list[tuple[float, float]] = []  # (wall time, CPU seconds of the tree), last two

    def sample(self, now: float) -> None:
        if now < self.next_sample:
            return
        self.next_sample = now + SAMPLE_S
        total = 0.0
        for pid in [self.pid, *proc.descendants(self.pid)]:
            self.known.setdefault(pid, proc.process_start_time(pid))
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        self.cpu = (self.cpu + [(now, total)])[-2:]

    def cpu_share(self) -> float | None:
        """CPU cores used by the tree between the last two samples; None before two samples."""
        if len(self.cpu) < 2 or self.cpu[1][0] <= self.cpu[0][0]:
            return None
        (t0, c0), (t1, c1) = self.cpu
        return max(0.0, c1 - c0) / (t1 - t0)

    def stalled(self, now: float, last_progress: float, history, epoch_start: int, cfg, nvml) -> Stalled | None:
        """A Stalled event when no epoch came for longer than the hang limit and the tree is idle."""
        quiet = now - max(last_progress, self.started)
        this_attempt = sum(1 for e in history.records if e >= epoch_start)
        limit = hang_limit([r.epoch_time for r in history.ordered()[-20:]], this_attempt, cfg)
        share = self.cpu_share()
        if quiet <= limit or share is None or share * 100 >= cfg.hang.idle_cpu_percent:
            return None
        util = nvml.utilization_for(set(self.known)) if nvml is not None else None
        if util is not None and util > cfg.hang.idle_cpu_percent:
            return None  # the GPU is busy: slow, not hung
        return Stalled(quiet, limit)

    def survivors(self) -> list[int]:
        return [pid for pid, t in self.known.items() if pid != self.pid and proc.same_process(pid, t)]
