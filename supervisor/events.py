"""The vocabulary of the decision function: events in, actions out, exit codes. Plain frozen dataclasses.

Events are built by adapters from what they measured (a log line, a signal, a child exit, a temperature
poll, an activity sample, the result of an action); actions are carried out by daemon.py (spawn, signal
the process group, edit the plans file, log, exit). An action whose result matters to the next decision
reports it as a follow-up event (BatchSizeSet, ActionFailed), queued and handled by the loop like any
other event. Nothing here decides anything: policy.decide does.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .classify import Exit
from .diagnose import EpochProfile
from .logparse import EpochRecord


class ExitCode(enum.IntEnum):
    """The exit status of `cardiacseg-train run`: the one declaration the CLI, the policy, the unit's
    RestartPreventExitStatus (checked by a test) and the README's table (generated) use."""

    def __new__(cls, value: int, meaning: str, systemd: str, prevent_restart: bool):
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.meaning, obj.systemd, obj.prevent_restart = meaning, systemd, prevent_restart
        return obj

    OK = (0, "done: target reached, training completed, or stopped on request", "no restart", False)
    INTERNAL = (1, "internal error: a bug in the supervisor (the only case with a traceback)", "restart", False)
    CONFIG = (2, "configuration error: config.toml, the plans file, a folder that cannot be written, another "
                 "trainer on the same fold, or the trainer reported a missing dataset/trainer/plans",
              "no restart", True)
    GAVE_UP = (3, "gave up: restart budget spent, CUDA OOM at the minimum batch size, training diverged, "
                  "no readable checkpoint left, or the disk stayed full", "no restart", True)
    LOCKED = (4, "another supervisor already runs on this state directory", "restart (later)", False)

    @property
    def systemd_restarts(self) -> bool:
        return not self.prevent_restart


def exit_code_table() -> str:
    """The README's exit-code table (a test keeps the README equal to it)."""
    rows = ["| code | `run` means | systemd |", "| --- | --- | --- |"]
    rows += [f"| {int(c)} | {c.meaning} | {c.systemd} |" for c in ExitCode]
    return "\n".join(rows)


# ---- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    """The supervisor starts (again): what it found on disk."""
    final_checkpoint: bool = False        # checkpoint_final.pth is there
    validation_done: bool = False         # ... and the final validation's summary.json too
    last_epoch: EpochRecord | None = None  # history replayed from the logs
    batch_size: int | None = None         # what the plans file says now
    n_proc_da: int | None = None          # what the trainer would use now
    leftover_pgid: int | None = None      # a trainer a killed supervisor left behind (still alive)
    best_checkpoint_ok: bool = False      # checkpoint_best.pth exists and is a complete archive
    slurm_restarts: int | None = None     # SLURM_RESTART_COUNT inside a SLURM job (None outside)


@dataclass(frozen=True)
class Reconfigured:
    """The config was reloaded (the new one is the cfg of this and every later decision)."""
    last_epoch: EpochRecord | None = None


@dataclass(frozen=True)
class EpochStarted:
    """An "Epoch N" log line: nnU-Net writes it after the previous epoch's checkpoint saves (a safe point)."""
    epoch: int


@dataclass(frozen=True)
class EpochDone:
    """An epoch's last log line ("Epoch time"); its checkpoint saves follow."""
    record: EpochRecord


@dataclass(frozen=True)
class TrainingDone:
    """"Training done.": checkpoint_final is written, the final validation runs (a safe point)."""


@dataclass(frozen=True)
class Activity:
    """One sample of how busy the attempt's process tree is (for the hang rule)."""
    cpu_share: float | None        # cores used since the previous sample; None before two samples
    gpu_util: float | None = None  # percent, where NVML tells


@dataclass(frozen=True)
class Readings:
    """One poll of the thermal sensors: gpu -> celsius (None = unknown), and GPUs NVML reports lost."""
    temps: tuple[tuple[str, float | None], ...] = ()
    lost: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class DiskSpace:
    """Free space of the folder the trainer writes checkpoints to (measured while waiting for space)."""
    free_bytes: int
    needed_bytes: int
    folder: str


@dataclass(frozen=True)
class EpochProfiled:
    """Where one epoch's time went: the launcher's timings plus the machine's samples (profiling.py)."""
    profile: EpochProfile


@dataclass(frozen=True)
class NoCheckpoint:
    """Every checkpoint was unreadable and moved aside, and a fresh start is not allowed."""
    message: str


@dataclass(frozen=True)
class BatchSizeSet:
    """SetBatchSize succeeded: the plans file now says `new`."""
    old: int
    new: int


@dataclass(frozen=True)
class ActionFailed:
    """Carrying out an action failed in a way that restarting cannot fix (e.g. plans not writable)."""
    action: str
    message: str


@dataclass(frozen=True)
class ChildExited:
    exit: Exit
    best_checkpoint_ok: bool = True       # checkpoint_best.pth exists and is a complete archive
    after_our_stop: bool | None = None    # our SIGINT was sent before the exit was seen (None: unknown)


@dataclass(frozen=True)
class StopRequested:
    signame: str = "SIGTERM"
    preempt: bool = False  # inside a SLURM job: time limit near (SIGUSR1) or preemption (SIGTERM)


@dataclass(frozen=True)
class Requeued:
    """The result of Requeue: "requeued", "ending" (SLURM already ends the job: scancel, its own kill),
    or "failed"."""
    result: str
    message: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passed (deadlines are checked against the monotonic `now` of every decision)."""


EVENTS = (Start, Reconfigured, EpochStarted, EpochDone, TrainingDone, Activity, Readings, DiskSpace, EpochProfiled,
          NoCheckpoint, BatchSizeSet, ActionFailed, ChildExited, StopRequested, Requeued, Tick)


# ---- actions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    """Start the next attempt (the executor verifies the checkpoint --c will load first); reports
    NoCheckpoint when none is readable, ChildExited when the program cannot be started."""
    validate_only: bool = False  # nnU-Net's --val: only the final validation (training is complete)


@dataclass(frozen=True)
class MeasureDisk:
    """Measure the free space where checkpoints go; reports DiskSpace."""


@dataclass(frozen=True)
class SignalGroup:
    sig: int


@dataclass(frozen=True)
class StopLeftover:
    """Stop a trainer a killed supervisor left behind (its whole tree), before anything starts."""
    pgid: int


@dataclass(frozen=True)
class Log:
    event: str
    level: str = "info"
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    code: ExitCode


@dataclass(frozen=True)
class SetBatchSize:
    """Write the plans file; reports BatchSizeSet or ActionFailed."""
    old: int
    new: int


@dataclass(frozen=True)
class Requeue:
    """Ask SLURM to run this job again (`scontrol requeue JOB`); reports Requeued."""


@dataclass(frozen=True)
class SetWorkers:
    """Record the new nnUNet_n_proc_DA (passed to the next attempt's environment)."""
    old: int
    new: int


