"""One training attempt: its process, output, every process of it, and how busy they are.

How it works: a trainer we start leads its own process group (start_new_session), so pgid == pid. A
trainer we adopt (`run --take-over`: another trainer on the fold, to be stopped at its safe point) is
not our child: its end is seen by its pid disappearing, its exit status is unknown, and when it shares
the supervisor's own process group (started with `&` from the same shell) it is signalled by pid and
descendants, never by group. Every few seconds `sample()` records the trainer's descendants and the
orphans of its tree reparented to the supervisor (pid + start time, so a reused pid is never mistaken
for ours, and a worker that left the group with setsid, or a daemon that double-forked, is still known) and the CPU seconds the whole tree has used, and returns an Activity event (cores used
since the previous sample, GPU utilisation where NVML tells) for the policy's hang rule: this module
measures, it does not decide. `remnants()` reports what is left after the trainer itself exited;
`members()` (pid -> start time) is persisted in state.json so a supervisor restarted after SIGKILL can
stop every one of them, even when the trainer (the group leader) is already gone.
"""
from __future__ import annotations

import os

import psutil

from supervisor.core.events import Activity, EpochProfiled, Remnants
from supervisor.daemon.trainer_output import TrainerOutput
from supervisor.integrations import proc
from supervisor.integrations.profiling import MachineSampler, ProfileFollower, make_profile

SAMPLE_S = 5.0


class Attempt:
    def __init__(self, n: int, pid: int, now: float, popen=None, output: TrainerOutput | None = None,
                 profile_path=None, nvml=None, adopted: tuple[int, ...] = ()):
        self.n, self.popen, self.output = n, popen, output
        self.pid = pid
        self.adopted = tuple(adopted)
        try:
            self.pgid = os.getpgid(pid) if adopted else pid
        except OSError:
            self.pgid = pid
        self.started = now
        self.open_streams = 2 if popen is not None else 0
        self.exited = False
        self.returncode: int | None = None
        self.known: dict[int, float | None] = {p: proc.process_start_time(p) for p in (pid, *adopted)}
        self.oom_kills_at_start = proc.cgroup_oom_kills()
        self.next_sample = 0.0
        self.cpu: list[tuple[float, float]] = []  # (time, CPU seconds of the tree), last two
        # where each epoch's time goes: the launcher's sidecar, and the machine sampled meanwhile
        self.profile = ProfileFollower(profile_path) if profile_path is not None else None
        self.machine = MachineSampler(nvml, lambda: (self.pid, list(self.known)))

    # ---- the main process ------------------------------------------------------------------------
    def poll(self) -> bool:
        """True once the main process is gone (the first time and after): returncode is then set when known."""
        if self.exited:
            return True
        if self.popen is not None:
            rc = self.popen.poll()
            if rc is None:
                return False
            self.returncode = rc
            proc.release(self.popen)
        elif any(proc.running(p, self.known.get(p)) for p in (self.pid, *self.adopted)):
            return False
        self.exited = True
        return True

    def signal(self, sig: int) -> bool:
        """Signal every process of the attempt: the group of each of its main processes (an adopted trainer
        may be several, in several groups), or, where one shares the supervisor's own group, that process
        and its descendants (never our own group)."""
        sent, ours = False, os.getpgrp()
        for pid in (self.pid, *self.adopted) if self.adopted else (self.pid,):
            try:
                group = os.getpgid(pid) if self.adopted else self.pgid
            except OSError:
                continue
            if group != ours:
                sent |= proc.signal_group(group, sig)
            else:
                for p in (pid, *proc.descendants(pid)):
                    sent |= proc.send(p, sig)
        return sent

    def learn(self, pids) -> None:
        """Processes of the attempt found another way (its marker): known from now on by their start time."""
        for pid in pids:
            self.known.setdefault(pid, proc.process_start_time(pid))

    # ---- measurements ----------------------------------------------------------------------------
    def profiles(self, now: float, cfg) -> list[EpochProfiled]:
        """Sample the machine (every few seconds) and turn the launcher's new epoch lines into events."""
        if self.profile is None:
            return []
        if not self.exited:
            self.machine.sample(now)
        return [EpochProfiled(make_profile(line, self.machine.epoch_summary(), cfg)) for line in self.profile.poll()]

    def sample(self, now: float, nvml=None) -> Activity | None:
        """Every SAMPLE_S: learn new descendants, measure the tree's CPU use; None between samples."""
        if now < self.next_sample:
            return None
        self.next_sample = now + SAMPLE_S
        total = 0.0
        for pid in [self.pid, *proc.descendants(self.pid), *proc.orphans()]:
            self.known.setdefault(pid, proc.process_start_time(pid))
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        self.cpu = (self.cpu + [(now, total)])[-2:]
        share = self.cpu_share()
        util = nvml.utilization_for(set(self.known)) if nvml is not None and share is not None else None
        return Activity(cpu_share=share, gpu_util=util)

    def cpu_share(self) -> float | None:
        """CPU cores used by the tree between the last two samples; None before two samples."""
        if len(self.cpu) < 2 or self.cpu[1][0] <= self.cpu[0][0]:
            return None
        (t0, c0), (t1, c1) = self.cpu
        return max(0.0, c1 - c0) / (t1 - t0)

    def remnants(self, nvml) -> Remnants:
        """What is left of the attempt after its main process exited (for the policy's reaping rule)."""
        self.learn(proc.orphans())  # orphaned by the trainer's end: reparented to us
        alive = set(self.survivors())
        if self.pgid != os.getpgrp() and proc.group_alive(self.pgid):
            alive.add(self.pgid)
        holders = tuple(sorted(nvml.compute_pids() & set(self.known))) if nvml is not None else ()
        return Remnants(alive=len(alive), streams_open=self.open_streams > 0, gpu_holders=holders)

    def members(self) -> dict[str, float | None]:
        """Every process of the attempt seen so far, for state.json (JSON keys are strings)."""
        return {str(pid): t for pid, t in self.known.items()}

    def survivors(self) -> list[int]:
        return [pid for pid, t in self.known.items() if pid != self.pid and proc.running(pid, t)]
