"""What the decision function consumes (events) and produces (actions): plain frozen dataclasses.

Events are built by daemon.py from what happened (a log line, a signal, a child exit, a poll); actions
are carried out by daemon.py (spawn, signal the process group, edit the plans file, log, exit).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .classify import Exit
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


# ---- events ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    final_checkpoint: bool = False        # checkpoint_final.pth already there: nothing to train
    last_epoch: EpochRecord | None = None  # history replayed from the logs
    batch_size: int | None = None         # what the plans file says now
    n_proc_da: int | None = None          # what the trainer would use now


@dataclass(frozen=True)
class Reconfigured:
    """The config was reloaded; the decision function re-checks the target against the last epoch."""
    last_epoch: EpochRecord | None = None
    mid_epoch: bool = False  # a newer epoch has started: its checkpoint saves are behind us


@dataclass(frozen=True)
class Stalled:
    """No epoch progress for longer than the hang limit, and the process tree is idle."""
    quiet_s: float
    limit_s: float


@dataclass(frozen=True)
class NoCheckpoint:
    """Every checkpoint was unreadable and moved aside, and a fresh start is not allowed."""
    message: str


@dataclass(frozen=True)
class ActionFailed:
    """Carrying out an action failed in a way that restarting cannot fix (e.g. plans not writable)."""
    message: str


@dataclass(frozen=True)
class EpochDone:
    record: EpochRecord


@dataclass(frozen=True)
class SafePoint:
    """A log line written after the epoch's checkpoint saves ("Epoch N", "Training done.")."""


@dataclass(frozen=True)
class ChildExited:
    exit: Exit


@dataclass(frozen=True)
class StopRequested:
    signame: str = "SIGTERM"


@dataclass(frozen=True)
class Tick:
    pass


# ---- actions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawn:
    pass


@dataclass(frozen=True)
class SignalGroup:
    sig: int


@dataclass(frozen=True)
class Log:
    event: str
    level: str = "info"
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    code: int


@dataclass(frozen=True)
class SetBatchSize:
    old: int
    new: int


@dataclass(frozen=True)
class SetWorkers:
    old: int
    new: int


@dataclass(frozen=True)
class Temperatures:
    """One poll of the thermal guard: its verdict (thermal.verdict) and the readings behind it."""
    verdict: str | None
    summary: dict = field(default_factory=dict)  # gpu -> celsius (None = unknown)
    failed: bool = False                          # this poll could not read every GPU
