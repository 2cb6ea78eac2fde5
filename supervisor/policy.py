"""The supervisor's decisions, as a pure function: decide(sup, event, now, cfg) -> (sup', actions).

Nothing here does I/O, reads the clock or sleeps (the model is h11's _state.py). `daemon.py` turns what
happened into Events, calls `decide`, and carries out the returned Actions. Every deadline (backoff,
SIGKILL escalation, the wait for a checkpoint write) is a timestamp kept in `Sup` and checked when a
`Tick` arrives, so the loop never sleeps on a decision and a supervisor restarted from state.json
continues where it was.

Restart budget: OTP-style intensity. At most `max_restarts` restarts within `window_minutes`; the
restart that would exceed it makes the supervisor give up (exit 3). Backoff doubles per consecutive
failure from `backoff_seconds` up to `backoff_max_seconds`; an attempt that finished at least one
epoch resets the doubling, because it proved the set-up works.

Out of memory has its own budget: a CUDA OOM steps the batch size down (SetBatchSize, then a restart
that does not count against the crash budget); since every step lowers the batch size, the budget is
bounded by the step sequence, and an OOM at `[oom].min_batch_size` gives up (exit 3). A host OOM halves
nnU-Net's augmentation workers (nnUNet_n_proc_DA) the same way; at one worker it is an ordinary,
counted restart.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import signal
from dataclasses import dataclass, field

from .classify import RESTARTABLE, Reason, classify
from .config import Config
from .events import (ActionFailed, ChildExited, EpochDone, Finish, Log, NoCheckpoint, Reconfigured,  # noqa: F401
                     SafePoint, SetBatchSize, SetWorkers, SignalGroup, Spawn, Stalled, Start, StopRequested,
                     Temperatures, Tick)
from .logparse import EpochRecord, nanmean
from .plans import next_batch_size, step_sequence

from .events import ExitCode
EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_GAVE_UP, EXIT_LOCKED = ExitCode


class State(str, enum.Enum):
    """Where the supervised job stands.

    Lifecycle::

        IDLE --Start--> RUNNING --EpochDone(target met)--> STOP_PENDING --SafePoint/timeout--> STOPPING
        RUNNING/STOP_PENDING --StopRequested--> STOPPING          (SIGINT to the process group)
        STOPPING --Tick past stop deadline--> STOPPING (SIGKILL sent)
        RUNNING/STOPPING --ChildExited--> DONE      (completed, target_reached, stopped)
                                      --> BACKOFF   (crash, cuda_oom, host_oom, ... within budget)
                                      --> FAILED    (config_error, budget exhausted)
        BACKOFF --Tick past restart_at--> RUNNING   (spawned again with --c)
        BACKOFF --StopRequested--> DONE
        RUNNING --Temperatures(pause)--> PAUSED (SIGSTOP) --Temperatures(resume)--> RUNNING (SIGCONT)
        RUNNING/PAUSED/STOP_PENDING --Temperatures(stop_*)--> STOPPING --ChildExited--> COOLING
        COOLING --Temperatures(cooled)--> RUNNING   (spawned again with --c; thermal stops are free)

    STOP_PENDING exists because SIGINT saves nothing in nnU-Net: after the epoch that meets the target,
    the trainer may still be writing checkpoint_best.pth. The next "Epoch N" or "Training done." log
    line (written after the saves) is the safe point to interrupt it.
    """

    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    COOLING = "cooling"
    STOP_PENDING = "stop_pending"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    DONE = "done"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.FAILED})


@dataclass(frozen=True)
class Sup:
    state: State = State.IDLE
    attempt: int = 0                       # attempts started so far
    stop_intent: str | None = None         # "target" | "operator" while we are stopping it
    safe_deadline: float | None = None     # STOP_PENDING: send SIGINT at the latest then
    stop_deadline: float | None = None     # STOPPING: SIGKILL then
    killed: bool = False                   # SIGKILL sent to this attempt
    restart_at: float | None = None        # BACKOFF: spawn then
    restart_counts: bool = True            # BACKOFF: the coming restart counts against the crash budget
    restart_times: tuple[float, ...] = ()  # wall-clock times of restarts (intensity window)
    consecutive_failures: int = 0
    progress: bool = False                 # this attempt finished an epoch
    last_reason: Reason | None = None
    outcome: str | None = None             # final: completed / target_reached / stopped / gave_up / config_error
    message: str | None = None             # human explanation of the outcome
    exit_code: int | None = None
    batch_size: int | None = None          # current, as written in the plans file
    original_batch_size: int | None = None  # before the supervisor changed anything
    oom_steps: int = 0
    n_proc_da: int | None = None           # augmentation workers passed to the trainer
    paused_at: float | None = None         # PAUSED since
    paused_total: float = 0.0              # seconds paused for heat, all attempts
    failed_reads: int = 0                  # thermal polls in a row without every reading
    temps: dict = field(default_factory=dict)  # last thermal poll: gpu -> celsius
    nonfinite_streak: int = 0              # epochs in a row with non-finite loss or Dice
    since_best: int = 0                    # epochs since the last new best EMA

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        d["last_reason"] = self.last_reason.value if self.last_reason else None
        d["restart_times"] = list(self.restart_times)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Sup":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["state"] = State(d.get("state", "idle"))
        d["last_reason"] = Reason(d["last_reason"]) if d.get("last_reason") else None
        d["restart_times"] = tuple(d.get("restart_times", ()))
        return cls(**d)


# ---- policy helpers (pure) -----------------------------------------------------------------------
def nonfinite(rec: EpochRecord) -> bool:
    """A nan/inf train loss, or a pseudo Dice that is nan for every class. Missing values are unknown."""
    dice = nanmean(rec.dice) if rec.dice else None
    return any(v is not None and not math.isfinite(v) for v in (rec.train_loss, dice))


def hang_limit(epoch_times: list[float], epochs_this_attempt: int, cfg: Config) -> float:
    """Seconds without an epoch after which an idle trainer counts as hung."""
    if epochs_this_attempt == 0:
        return cfg.hang.first_epoch_minutes * 60
    if cfg.hang.timeout_minutes > 0:
        return cfg.hang.timeout_minutes * 60
    times = sorted(t for t in epoch_times if t)
    median = times[len(times) // 2] if times else 0.0
    return max(cfg.hang.min_timeout_minutes * 60, 3 * median)


def target_met(rec: EpochRecord, cfg: Config) -> bool:
    if cfg.target.ema_dice is None or math.isnan(rec.ema) or rec.ema < cfg.target.ema_dice:
        return False
    if cfg.target.min_class_dice is not None:
        # nan (class absent from the validation batches) does not count as reached
        return bool(rec.dice) and all(not math.isnan(d) and d >= cfg.target.min_class_dice for d in rec.dice)
    return True


def backoff_delay(consecutive_failures: int, cfg: Config) -> float:
    """Delay before the restart that follows the n-th consecutive failure (n >= 1)."""
    n = max(consecutive_failures - 1, 0)
    return min(cfg.restart.backoff_max_seconds, cfg.restart.backoff_seconds * (2 ** min(n, 30)))


def restarts_in_window(times: tuple[float, ...], now: float, cfg: Config) -> tuple[float, ...]:
    horizon = now - cfg.restart.window_minutes * 60
    return tuple(t for t in times if t > horizon)


def _stop(s: Sup, intent: str, now: float, cfg: Config, why: str) -> tuple[Sup, list]:
    s = dataclasses.replace(s, state=State.STOPPING, stop_intent=intent, safe_deadline=None,
                            stop_deadline=now + cfg.stop.timeout_seconds)
    return s, [Log("stopping_trainer", fields={"why": why, "attempt": s.attempt}), SignalGroup(signal.SIGINT)]


def _finish(s: Sup, state: State, outcome: str, code: int, message: str, level="info"):
    s = dataclasses.replace(s, state=state, outcome=outcome, exit_code=code, message=message,
                            stop_deadline=None, safe_deadline=None, restart_at=None)
    return s, [Log("finished", level, {"outcome": outcome, "exit_code": code, "message": message}),
               Finish(code)]


def _spawn(s: Sup, now: float, restart: bool) -> tuple[Sup, list]:
    times = s.restart_times + ((now,) if restart and s.restart_counts else ())
    s = dataclasses.replace(s, state=State.RUNNING, attempt=s.attempt + 1, stop_intent=None,
                            killed=False, restart_at=None, stop_deadline=None, safe_deadline=None,
                            progress=False, restart_times=times, restart_counts=True)
    return s, [Spawn()]


def _oom_restart(s: Sup, now: float, cfg: Config, ended: Log, act, event: str, fields: dict):
    """Restart after an OOM remedy: base backoff, not counted against the crash budget."""
    s = dataclasses.replace(s, state=State.BACKOFF, restart_at=now + cfg.restart.backoff_seconds,
                            restart_counts=False, stop_intent=None)
    return s, [ended, act, Log(event, "warning", fields),
               Log("restart_scheduled", "warning", {"reason": s.last_reason.value,
                                                    "delay_s": cfg.restart.backoff_seconds, "counted": False})]


def _on_cuda_oom(s: Sup, now: float, cfg: Config, ended: Log):
    bs = s.batch_size
    new = next_batch_size(bs, cfg.oom.min_batch_size, cfg.oom.strategy, cfg.oom.subtract, cfg.oom.factor)
    if new is None:
        tried = " -> ".join(str(b) for b in step_sequence(
            s.original_batch_size or bs, cfg.oom.min_batch_size, cfg.oom.strategy, cfg.oom.subtract,
            cfg.oom.factor))
        s, acts = _finish(
            s, State.FAILED, "gave_up", EXIT_GAVE_UP,
            f"CUDA out of memory at the minimum batch size {bs} (batch sizes tried: {tried}). "
            "What can help: free the GPU of other processes (nvidia-smi), a smaller patch size or the "
            "3d_lowres configuration (a new plans/configuration), or a lower [oom].min_batch_size.",
            "error")
        return s, [ended, *acts]
    s = dataclasses.replace(s, batch_size=new, oom_steps=s.oom_steps + 1)
    return _oom_restart(s, now, cfg, ended, SetBatchSize(bs, new), "batch_size_reduced",
                        {"old": bs, "new": new, "min": cfg.oom.min_batch_size, "step": s.oom_steps})


def _unpause(s: Sup, now: float) -> list:
    return [SignalGroup(signal.SIGCONT)]


def _resumed(s: Sup, now: float) -> Sup:
    paused = (now - s.paused_at) if s.paused_at is not None else 0.0
    return dataclasses.replace(s, state=State.RUNNING, paused_at=None, paused_total=s.paused_total + paused)


def _on_temperatures(s: Sup, ev: Temperatures, now: float, cfg: Config):
    s = dataclasses.replace(s, temps=dict(ev.summary), failed_reads=s.failed_reads + 1 if ev.failed else 0)
    v, st, fields = ev.verdict, s.state, {"temps": dict(ev.summary)}
    if v == "pause" and st == State.RUNNING:
        s = dataclasses.replace(s, state=State.PAUSED, paused_at=now)
        return s, [Log("thermal_pause", "warning", {**fields, "above": cfg.thermal.pause_celsius}),
                   SignalGroup(signal.SIGSTOP)]
    if v == "resume" and st == State.PAUSED:
        paused_s = round(now - s.paused_at, 1) if s.paused_at is not None else None
        s = _resumed(s, now)
        return s, [Log("thermal_resume", fields={**fields, "paused_s": paused_s}), SignalGroup(signal.SIGCONT)]
    if v in ("stop_hot", "stop_pause", "stop_sensor", "gpu_lost") and st in (State.RUNNING, State.PAUSED,
                                                                             State.STOP_PENDING):
        intent = {"stop_hot": "thermal", "stop_pause": "thermal", "stop_sensor": "sensor",
                  "gpu_lost": "gpu_lost"}[v]
        if st == State.STOP_PENDING:
            intent = s.stop_intent or "target"  # already stopping for the target: keep that outcome
        cont = _unpause(s, now) if st == State.PAUSED else []
        s = _resumed(s, now) if st == State.PAUSED else s
        why = {"stop_hot": f"GPU too hot (stop at {cfg.thermal.stop_celsius:g} C; a multi-GPU run is never paused)",
               "stop_pause": f"paused longer than {cfg.thermal.max_pause_minutes:g} min",
               "stop_sensor": f"no temperature readings for {s.failed_reads} polls",
               "gpu_lost": "NVML reports the GPU lost"}[v]
        s, acts = _stop(s, intent, now, cfg, why)
        return s, [Log("thermal_stop", "error" if v == "gpu_lost" else "warning", {**fields, "why": why}),
                   *cont, *acts]
    if v == "cooled" and st == State.COOLING:
        s = dataclasses.replace(s, restart_counts=False)
        s, acts = _spawn(s, now, restart=True)
        return s, [Log("cooled", fields={**fields, "at_or_below": cfg.thermal.resume_celsius}), *acts]
    return s, []


# ---- the decision function -----------------------------------------------------------------------
def decide(s: Sup, ev, now: float, cfg: Config) -> tuple[Sup, list]:
    st = s.state
    if isinstance(ev, Start):
        s = dataclasses.replace(
            s, batch_size=ev.batch_size,
            original_batch_size=s.original_batch_size or ev.batch_size,
            # a reduction made by an earlier run of the supervisor stays in force
            n_proc_da=min(x for x in (s.n_proc_da, ev.n_proc_da) if x is not None)
            if (s.n_proc_da or ev.n_proc_da) else None)
        if ev.final_checkpoint:
            return _finish(s, State.DONE, "completed", EXIT_OK,
                           "checkpoint_final.pth exists: training already completed")
        if ev.last_epoch is not None and target_met(ev.last_epoch, cfg):
            return _finish(s, State.DONE, "target_reached", EXIT_OK,
                           f"target already reached at epoch {ev.last_epoch.epoch} "
                           f"(EMA {ev.last_epoch.ema:.4f})")
        if st == State.COOLING and cfg.thermal.enabled:  # stopped for heat before the supervisor restarted
            return s, [Log("still_cooling", "warning", {"resume_below": cfg.thermal.resume_celsius})]
        if st == State.BACKOFF and s.restart_at is not None:
            return s, [Log("resuming_backoff", fields={"restart_in_s": round(max(0, s.restart_at - now), 1)})]
        return _spawn(s, now, restart=False)

    if isinstance(ev, Reconfigured):
        if st == State.RUNNING and ev.last_epoch is not None and target_met(ev.last_epoch, cfg):
            fields = {"epoch": ev.last_epoch.epoch, "ema": round(ev.last_epoch.ema, 4),
                      "target": cfg.target.ema_dice, "via": "reload"}
            if ev.mid_epoch:  # no checkpoint write can be in progress: stop now
                s, acts = _stop(s, "target", now, cfg, "target reached (lowered by reload)")
                return s, [Log("target_reached", fields=fields), *acts]
            s = dataclasses.replace(s, state=State.STOP_PENDING, stop_intent="target",
                                    safe_deadline=now + cfg.stop.checkpoint_wait_seconds)
            return s, [Log("target_reached", fields=fields)]
        return s, []

    if isinstance(ev, Temperatures):
        return _on_temperatures(s, ev, now, cfg)

    if isinstance(ev, ActionFailed):
        return _finish(s, State.FAILED, "config_error", EXIT_CONFIG, ev.message, "error")

    if isinstance(ev, NoCheckpoint):
        return _finish(s, State.FAILED, "gave_up", EXIT_GAVE_UP, ev.message, "error")

    if isinstance(ev, Stalled):
        if st != State.RUNNING:
            return s, []
        s, acts = _stop(s, "hang", now, cfg, f"no epoch progress for {ev.quiet_s:.0f} s and the trainer is idle")
        return s, [Log("hang_detected", "warning", {"quiet_s": round(ev.quiet_s), "limit_s": round(ev.limit_s)}),
                   *acts]

    if isinstance(ev, EpochDone):
        if st not in (State.RUNNING, State.STOP_PENDING, State.STOPPING):
            return s, []
        rec = ev.record
        s = dataclasses.replace(s, progress=True,
                                nonfinite_streak=s.nonfinite_streak + 1 if nonfinite(rec) else 0,
                                since_best=0 if rec.new_best else s.since_best + 1)
        if st != State.RUNNING:
            return s, []
        if cfg.target.max_nonfinite_epochs and s.nonfinite_streak >= cfg.target.max_nonfinite_epochs:
            s, acts = _stop(s, "diverged", now, cfg,
                            f"non-finite loss or Dice for {s.nonfinite_streak} epochs in a row")
            return s, [Log("diverged", "error", {"epoch": rec.epoch, "train_loss": rec.train_loss,
                                                 "streak": s.nonfinite_streak}), *acts]
        if cfg.target.patience_epochs and s.since_best >= cfg.target.patience_epochs:
            s = dataclasses.replace(s, state=State.STOP_PENDING, stop_intent="plateau",
                                    safe_deadline=now + cfg.stop.checkpoint_wait_seconds)
            return s, [Log("plateau", fields={"epoch": rec.epoch, "epochs_without_new_best": s.since_best,
                                              "best_ema": None if math.isnan(rec.ema) else round(rec.ema, 4)})]
        if target_met(ev.record, cfg):
            s = dataclasses.replace(s, state=State.STOP_PENDING, stop_intent="target",
                                    safe_deadline=now + cfg.stop.checkpoint_wait_seconds)
            return s, [Log("target_reached", fields={"epoch": ev.record.epoch,
                                                     "ema": round(ev.record.ema, 4),
                                                     "target": cfg.target.ema_dice})]
        return s, []

    if isinstance(ev, SafePoint):
        if st == State.STOP_PENDING:
            return _stop(s, s.stop_intent or "target", now, cfg,
                         f"{s.stop_intent or 'target'} reached; checkpoint writes finished")
        return s, []

    if isinstance(ev, StopRequested):
        if st in (State.RUNNING, State.STOP_PENDING, State.PAUSED):
            cont = _unpause(s, now) if st == State.PAUSED else []
            s = _resumed(s, now) if st == State.PAUSED else s
            s, acts = _stop(s, "operator", now, cfg, f"{ev.signame} to the supervisor")
            return s, [Log("stop_requested", fields={"signal": ev.signame}), *cont, *acts]
        if st == State.STOPPING:
            if s.stop_intent == "target":  # already stopping; the operator's stop wins the label
                s = dataclasses.replace(s, stop_intent="operator")
            if not s.killed:
                s = dataclasses.replace(s, killed=True)
                return s, [Log("stop_escalated", "warning", {"signal": ev.signame}),
                           SignalGroup(signal.SIGKILL)]
            return s, []
        if st in (State.IDLE, State.BACKOFF, State.COOLING):
            return _finish(s, State.DONE, "stopped", EXIT_OK, f"stopped by {ev.signame}")
        return s, []

    if isinstance(ev, Tick):
        if st == State.STOP_PENDING and s.safe_deadline is not None and now >= s.safe_deadline:
            return _stop(s, s.stop_intent or "target", now, cfg, "checkpoint wait timed out")
        if st == State.STOPPING and not s.killed and s.stop_deadline is not None and now >= s.stop_deadline:
            s = dataclasses.replace(s, killed=True)
            return s, [Log("stop_timeout", "warning", {"timeout_s": cfg.stop.timeout_seconds}),
                       SignalGroup(signal.SIGKILL)]
        if st == State.BACKOFF and s.restart_at is not None and now >= s.restart_at:
            return _spawn(s, now, restart=True)
        return s, []

    if isinstance(ev, ChildExited):
        if st not in (State.RUNNING, State.STOP_PENDING, State.STOPPING, State.PAUSED):
            return s, []
        if st == State.PAUSED:
            s = _resumed(s, now)
        x = dataclasses.replace(ev.exit, stop_intent=s.stop_intent if st in (State.STOPPING, State.STOP_PENDING)
                                else None, we_killed=s.killed)
        reason = classify(x)
        s = dataclasses.replace(s, last_reason=reason, stop_deadline=None, safe_deadline=None)
        ended = Log("attempt_ended", "info" if reason not in RESTARTABLE else "warning",
                    {"attempt": s.attempt, "reason": reason.value, "exit_code": x.returncode})
        if reason == Reason.DIVERGED:
            s, acts = _finish(s, State.FAILED, "diverged", EXIT_GAVE_UP,
                              f"training diverged: non-finite loss or pseudo Dice for {s.nonfinite_streak} epochs "
                              "in a row. Not restarted into the same divergence: check the data and the "
                              "learning rate, move the bad checkpoints aside, then start again.", "error")
            return s, [ended, *acts]
        if reason in (Reason.COMPLETED, Reason.TARGET_REACHED, Reason.STOPPED, Reason.PLATEAU):
            s, acts = _finish(s, State.DONE, reason.value, EXIT_OK, f"attempt {s.attempt}: {reason.value}")
            return s, [ended, *acts]
        if reason == Reason.CONFIG_ERROR:
            s, acts = _finish(s, State.FAILED, "config_error", EXIT_CONFIG,
                              "the trainer reported a configuration error (see its stderr above); "
                              "restarting cannot help", "error")
            return s, [ended, *acts]
        if reason in (Reason.THERMAL_STOP, Reason.SENSOR_LOST):
            s = dataclasses.replace(s, state=State.COOLING, stop_intent=None)
            return s, [ended, Log("cooling", "warning", {"reason": reason.value, "resume_below": cfg.thermal.resume_celsius,
                                                         "temps": s.temps})]
        # restartable
        if reason == Reason.CUDA_OOM and cfg.oom.enabled and s.batch_size is not None:
            return _on_cuda_oom(s, now, cfg, ended)
        if reason == Reason.HOST_OOM and s.n_proc_da is not None and s.n_proc_da > 1:
            old, new = s.n_proc_da, max(1, s.n_proc_da // 2)
            s = dataclasses.replace(s, n_proc_da=new)
            return _oom_restart(s, now, cfg, ended, SetWorkers(old, new), "workers_reduced",
                                {"variable": "nnUNet_n_proc_DA", "old": old, "new": new})
        recent = restarts_in_window(s.restart_times, now, cfg)
        if len(recent) >= cfg.restart.max_restarts:
            s = dataclasses.replace(s, restart_times=recent)
            s, acts = _finish(s, State.FAILED, "gave_up", EXIT_GAVE_UP,
                              f"{len(recent)} restarts within {cfg.restart.window_minutes:g} min "
                              f"(restart.max_restarts = {cfg.restart.max_restarts}); last reason: {reason.value}",
                              "error")
            return s, [ended, *acts]
        failures = 1 if s.progress else s.consecutive_failures + 1
        delay = backoff_delay(failures, cfg)
        s = dataclasses.replace(s, state=State.BACKOFF, restart_at=now + delay, restart_times=recent,
                                consecutive_failures=failures, stop_intent=None, restart_counts=True)
        return s, [ended, Log("restart_scheduled", "warning",
                              {"reason": reason.value, "delay_s": round(delay, 1),
                               "restart": len(recent) + 1, "max_restarts": cfg.restart.max_restarts})]
    raise TypeError(f"unknown event {ev!r}")
