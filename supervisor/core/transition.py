"""Moving between states: `transition()`, the only code that changes Sup.state, and the building blocks
the rules share (stop now or at the safe point, finish, start an attempt, leave a pause, count an epoch).

How it works: every building block that moves the job returns (sup', actions) with exactly one
`StateChanged` among the actions, made by `transition()`. policy.decide then checks the move against the
rule that made it (each rule declares the states it may move to) and that a state change came with its
StateChanged, so a rule cannot move the job anywhere it did not declare, nor silently.
"""
from __future__ import annotations

import dataclasses
import math
import signal

from supervisor.core import criteria
from supervisor.core.actions import Finish, InspectCheckpoints, Log, SignalGroup, StateChanged
from supervisor.core.classify import Reason
from supervisor.core.exit_codes import ExitCode
from supervisor.core.record import State, Sup


def transition(s: Sup, new: State, cause, detail: dict | None = None, **changes) -> tuple[Sup, StateChanged]:
    """Move to `new` (applying `changes`); the StateChanged action is how everything else learns of it."""
    cause = cause.value if isinstance(cause, Reason) else str(cause)
    s2 = dataclasses.replace(s, state=new, **changes)
    return s2, StateChanged(s.state.value, new.value, cause, s2.attempt, dict(detail or {}))


def r4(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)


def stop(s: Sup, reason: Reason, now, cfg, why: str):
    """SIGINT now (nnU-Net's own stop); SIGKILL at stop.timeout_seconds."""
    s, ch = transition(s, State.STOPPING, reason, {"why": why}, stop_reason=reason, safe_deadline=None,
                       stop_deadline=now + cfg.stop.timeout_seconds)
    return s, [ch, Log("stopping_trainer", fields={"why": why, "attempt": s.attempt}), SignalGroup(signal.SIGINT)]


def request_stop(s: Sup, reason: Reason, now, cfg, why: str, wait_s: float):
    """Stop at the next safe point: at once when no checkpoint write can be in progress."""
    if not s.writing or wait_s <= 0:
        return stop(s, reason, now, cfg, why)
    s, ch = transition(s, State.STOP_PENDING, reason, {"why": why, "wait_s": round(wait_s, 1)},
                       stop_reason=reason, safe_deadline=now + wait_s)
    return s, [ch, Log("stop_waits_for_checkpoint", fields={"why": why, "wait_s": round(wait_s, 1)})]


def finish(s: Sup, state: State, outcome: str, code: ExitCode, message: str, level="info"):
    """The final decision: DONE or FAILED, with the outcome, the exit status and the message a person reads."""
    s, ch = transition(s, state, outcome, {"message": message, "exit_code": int(code)}, outcome=outcome,
                       exit_code=int(code), message=message, stop_deadline=None, safe_deadline=None,
                       restart_at=None, disk_deadline=None)
    return s, [ch, Log("finished", level, {"outcome": outcome, "exit_code": int(code), "message": message}),
               Finish(int(code))]


def start_attempt(s: Sup, now, cfg, restart: bool, validate_only: bool = False, cause=None):
    """A new attempt: RUNNING, its checkpoint chosen first (InspectCheckpoints -> CheckpointsInspected).
    `restart`: the previous attempt ended and this one follows it (counted in Sup.restarts, and against
    the crash budget unless the rule said otherwise with restart_counts=False)."""
    times = s.restart_times + ((now,) if restart and s.restart_counts else ())
    reasons = dict(s.restart_reasons)
    why = cause or (s.last_reason.value if s.last_reason else "restart")
    if restart:
        reasons[why] = reasons.get(why, 0) + 1
    s, ch = transition(s, State.RUNNING, why if restart else (cause or "start"),
                       {"attempt": s.attempt + 1, "restart": restart, "validate_only": validate_only},
                       attempt=s.attempt + 1, stop_reason=None, killed=False, kill_deadline=None, stop_asked=False,
                       restart_at=None, stop_deadline=None, safe_deadline=None, progress=False,
                       restart_times=times, restart_counts=True, writing=False, final_phase=False,
                       last_progress=now, epochs_this_attempt=0, validate_only=validate_only,
                       disk_deadline=None, next_disk_check=None, restarts=s.restarts + bool(restart),
                       restart_reasons=reasons, exited=False, exit_after_stop=False, reap_deadline=None,
                       gpu_deadline=None, reap_overdue=False, taking_over=False)
    return s, [ch, InspectCheckpoints(cfg.checkpoint.verify)]


def resumed(s: Sup, now) -> Sup:
    """Account for leaving a pause: it counts neither as a stall nor against the epoch's time. The state
    itself is changed by the caller's transition()."""
    paused = (now - s.paused_at) if s.paused_at is not None else 0.0
    lp = s.last_progress + paused if s.last_progress is not None else None
    return dataclasses.replace(s, paused_at=None, paused_total=s.paused_total + paused, last_progress=lp)


def track_epoch(s: Sup, rec) -> Sup:
    return dataclasses.replace(
        s, progress=True, writing=True, epochs_this_attempt=s.epochs_this_attempt + 1,
        nonfinite_streak=s.nonfinite_streak + 1 if criteria.nonfinite(rec) else 0,
        diverged_from=(s.diverged_from if s.nonfinite_streak else rec.epoch) if criteria.nonfinite(rec) else None,
        since_best=0 if rec.new_best else s.since_best + 1,
        epoch_times=(s.epoch_times + ((rec.epoch_time,) if rec.epoch_time else ()))[-20:])
