"""The supervisor's state record: `State` (where the job stands) and `Sup` (everything decide needs).

How it works: `Sup` is a frozen dataclass; policy.decide returns a new one per event. Every time in it is
MONOTONIC (deadlines, pause start, last progress, restart times), so a clock step never fires or delays
a deadline. `to_json` stores them as wall-clock equivalents (readable by people and by `status`);
`from_json` re-bases them onto the reading process's monotonic clock and rejects anything that is not a
valid Sup with ValueError, so a damaged state.json is moved aside instead of crashing every start.
The building blocks at the end (_stop, _request_stop, _finish, _spawn, ...) are the shared pieces of the
transition rules in transitions.py.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import signal
from dataclasses import dataclass, field

from . import rules
from .classify import Reason
from .events import ExitCode, Finish, Log, SignalGroup, Spawn

class State(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"              # SIGSTOPped for heat
    STOP_PENDING = "stop_pending"  # a stop is decided; waiting for the safe point
    STOPPING = "stopping"          # SIGINT sent; SIGKILL at stop_deadline
    BACKOFF = "backoff"            # waiting to restart (or for SetBatchSize's result)
    COOLING = "cooling"            # stopped for heat; restart once cool
    NO_SPACE = "no_space"          # died of a full disk; restart once there is room
    REQUEUING = "requeuing"        # stopped for SLURM's time limit or preemption; asking SLURM to requeue
    DONE = "done"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.FAILED})
ACTIVE = frozenset({State.RUNNING, State.PAUSED, State.STOP_PENDING, State.STOPPING})
DEADLINES = ("safe_deadline", "stop_deadline", "restart_at", "paused_at", "last_progress", "disk_deadline",
             "next_disk_check")


@dataclass(frozen=True)
class Sup:
    state: State = State.IDLE
    attempt: int = 0                       # attempts started so far
    stop_reason: Reason | None = None      # why we are stopping it (STOP_PENDING/STOPPING)
    safe_deadline: float | None = None     # STOP_PENDING: SIGINT at the latest then
    stop_deadline: float | None = None     # STOPPING: SIGKILL then
    killed: bool = False                   # SIGKILL sent to this attempt
    stop_asked: bool = False               # a stop request arrived while a stop was already pending/underway
    restart_at: float | None = None        # BACKOFF: spawn then (None: waiting for an action's result)
    restart_counts: bool = True            # the coming restart counts against the crash budget
    restart_times: tuple = ()              # monotonic times of counted restarts (intensity window)
    consecutive_failures: int = 0
    progress: bool = False                 # this attempt finished an epoch
    last_reason: Reason | None = None
    outcome: str | None = None             # final: completed / target_reached / stopped / gave_up / ...
    message: str | None = None
    exit_code: int | None = None
    batch_size: int | None = None          # current, as written in the plans file
    original_batch_size: int | None = None
    oom_steps: int = 0
    n_proc_da: int | None = None           # augmentation workers passed to the trainer
    paused_at: float | None = None
    paused_total: float = 0.0              # seconds paused for heat, all attempts
    failed_reads: int = 0                  # thermal polls in a row without every reading
    temps: dict = field(default_factory=dict)
    nonfinite_streak: int = 0
    since_best: int = 0
    writing: bool = False                  # between an epoch's last line and the next: saves may run
    final_phase: bool = False              # after "Training done.": final validation
    last_progress: float | None = None     # monotonic time of the last epoch line (or the spawn)
    epochs_this_attempt: int = 0
    epoch_times: tuple = ()                # the last 20 epoch times (hang limit)
    validate_only: bool = False            # the attempt runs the final validation only (--val)
    disk_deadline: float | None = None     # NO_SPACE: give up then
    next_disk_check: float | None = None
    disk_needed: int | None = None
    slurm_restarts: int | None = None      # SLURM_RESTART_COUNT of this job (None outside SLURM)
    bottleneck: dict | None = None         # the last epoch's verdict (diagnose.Verdict.to_json())

    def to_json(self, now: float, wall: float) -> dict:
        # shallow (asdict deep-copies every value; this runs after every epoch): only dicts are copied
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(temps=dict(self.temps), bottleneck=dict(self.bottleneck) if self.bottleneck else None)
        d["state"] = self.state.value
        for k in ("last_reason", "stop_reason"):
            d[k] = getattr(self, k).value if getattr(self, k) else None
        for k in DEADLINES:  # monotonic -> wall clock, for people and for the next process
            d[k] = None if d[k] is None else d[k] - now + wall
        d["restart_times"] = [t - now + wall for t in self.restart_times]
        d["epoch_times"] = list(self.epoch_times)
        return d

    @classmethod
    def from_json(cls, d: dict, now: float, wall: float) -> "Sup":
        """Rebuild from state.json; ValueError for anything that is not a valid Sup (moved aside)."""
        if not isinstance(d, dict):
            raise ValueError("'sup' is not an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k not in fields:
                continue
            default = fields[k].default if fields[k].default is not dataclasses.MISSING else {}
            if k == "state":
                v = State(v)
            elif k in ("last_reason", "stop_reason"):
                v = Reason(v) if v is not None else None
            elif k in ("restart_times", "epoch_times"):
                if not isinstance(v, list) or not all(_num(x) for x in v):
                    raise ValueError(f"sup.{k}: expected a list of numbers")
                v = tuple(x - wall + now for x in v) if k == "restart_times" else tuple(v)
            elif k in ("temps", "bottleneck"):
                if not isinstance(v, dict) and not (k == "bottleneck" and v is None):
                    raise ValueError(f"sup.{k}: expected an object")
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"sup.{k}: expected true/false, got {v!r}")
            elif isinstance(default, (int, float)) or default is None:
                if v is not None and not (_num(v) or (isinstance(v, str) and k in ("outcome", "message"))):
                    raise ValueError(f"sup.{k}: expected a number, got {v!r}")
                if k in DEADLINES and v is not None:
                    v = v - wall + now
            out[k] = v
        return cls(**out)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---- building blocks (each returns (sup, actions)) ----------------------------------------------
def _r(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def _stop(s: Sup, reason: Reason, now, cfg, why: str):
    s = dataclasses.replace(s, state=State.STOPPING, stop_reason=reason, safe_deadline=None,
                            stop_deadline=now + cfg.stop.timeout_seconds)
    return s, [Log("stopping_trainer", fields={"why": why, "attempt": s.attempt}), SignalGroup(signal.SIGINT)]


def _request_stop(s: Sup, reason: Reason, now, cfg, why: str, wait_s: float):
    """Stop at the next safe point: at once when no checkpoint write can be in progress."""
    if not s.writing or wait_s <= 0:
        return _stop(s, reason, now, cfg, why)
    s = dataclasses.replace(s, state=State.STOP_PENDING, stop_reason=reason, safe_deadline=now + wait_s)
    return s, [Log("stop_waits_for_checkpoint", fields={"why": why, "wait_s": round(wait_s, 1)})]


def _finish(s: Sup, state: State, outcome: str, code: ExitCode, message: str, level="info"):
    s = dataclasses.replace(s, state=state, outcome=outcome, exit_code=int(code), message=message,
                            stop_deadline=None, safe_deadline=None, restart_at=None, disk_deadline=None)
    return s, [Log("finished", level, {"outcome": outcome, "exit_code": int(code), "message": message}),
               Finish(code)]


def _spawn(s: Sup, now, restart: bool, validate_only: bool = False):
    times = s.restart_times + ((now,) if restart and s.restart_counts else ())
    s = dataclasses.replace(s, state=State.RUNNING, attempt=s.attempt + 1, stop_reason=None, killed=False,
                            stop_asked=False,
                            restart_at=None, stop_deadline=None, safe_deadline=None, progress=False,
                            restart_times=times, restart_counts=True, writing=False, final_phase=False,
                            last_progress=now, epochs_this_attempt=0, validate_only=validate_only,
                            disk_deadline=None, next_disk_check=None)
    return s, [Spawn(validate_only)]


def _resumed(s: Sup, now) -> Sup:
    """Leave PAUSED: the pause counts neither as a stall nor against the epoch's time."""
    paused = (now - s.paused_at) if s.paused_at is not None else 0.0
    lp = s.last_progress + paused if s.last_progress is not None else None
    return dataclasses.replace(s, state=State.RUNNING, paused_at=None, paused_total=s.paused_total + paused,
                               last_progress=lp)


def _track_epoch(s: Sup, rec) -> Sup:
    return dataclasses.replace(
        s, progress=True, writing=True, epochs_this_attempt=s.epochs_this_attempt + 1,
        nonfinite_streak=s.nonfinite_streak + 1 if rules.nonfinite(rec) else 0,
        since_best=0 if rec.new_best else s.since_best + 1,
        epoch_times=(s.epoch_times + ((rec.epoch_time,) if rec.epoch_time else ()))[-20:])


