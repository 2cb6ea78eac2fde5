"""Rules for stopping: what a signal means, the targets, the safe point, the bounded waits, SLURM's requeue.

Stops the supervisor asks for (target, plateau, divergence, operator, heat, sensor or GPU loss, taking
over another trainer) wait for a safe point: after an epoch's last log line nnU-Net writes
checkpoint_best/latest, and SIGINT in the middle truncates the file (SIGINT saves nothing in nnU-Net). The
next "Epoch N" or "Training done." line is written after those saves. The wait is bounded
([stop].checkpoint_wait_seconds, or [thermal].stop_wait_seconds for heat); a second request forces it, a
third kills. A hang is stopped at once. Each rule is pure; states change only through transition.py.
"""
from __future__ import annotations

import dataclasses
import signal

from supervisor.core import criteria, rules_tune
from supervisor.core.actions import Log, Reload, Requeue, SignalGroup
from supervisor.core.classify import Reason
from supervisor.core.events import EpochDone, Reconfigured, Requeued, Signalled, SlurmJobState, TrainingDone
from supervisor.core.exit_codes import ExitCode
from supervisor.core.record import State, Sup
from supervisor.core.rules_attempt import _on_preempted
from supervisor.core.transition import finish, r4, request_stop, resumed, stop, track_epoch


def on_reconfigured(s: Sup, ev: Reconfigured, now, cfg):
    """a lowered target met by the last epoch -> stop at the safe point"""
    if not criteria.target_met(ev.last_epoch, cfg):
        return s, []
    s, acts = request_stop(s, Reason.TARGET_REACHED, now, cfg, "target reached (lowered by reload)",
                           cfg.stop.checkpoint_wait_seconds)
    return s, [Log("target_reached", fields={"epoch": ev.last_epoch.epoch, "ema": r4(ev.last_epoch.ema),
                                             "target": cfg.target.ema_dice, "via": "reload"}), *acts]


def on_epoch_done(s: Sup, ev: EpochDone, now, cfg):
    """divergence / plateau / target -> stop at the safe point; a worker trial judged (rules_tune)"""
    s, rec, wait = track_epoch(s, ev.record), ev.record, cfg.stop.checkpoint_wait_seconds
    if cfg.target.max_nonfinite_epochs and s.nonfinite_streak >= cfg.target.max_nonfinite_epochs:
        s, acts = request_stop(s, Reason.DIVERGED, now, cfg,
                               f"non-finite loss or Dice for {s.nonfinite_streak} epochs in a row", wait)
        return s, [Log("diverged", "error", {"epoch": rec.epoch, "train_loss": rec.train_loss,
                                             "streak": s.nonfinite_streak}), *acts]
    if cfg.target.patience_epochs and s.since_best >= cfg.target.patience_epochs:
        s, acts = request_stop(s, Reason.PLATEAU, now, cfg, "no new best EMA", wait)
        return s, [Log("plateau", fields={"epoch": rec.epoch, "epochs_without_new_best": s.since_best}), *acts]
    if criteria.target_met(rec, cfg):
        s, acts = request_stop(s, Reason.TARGET_REACHED, now, cfg, "target reached", wait)
        return s, [Log("target_reached", fields={"epoch": rec.epoch, "ema": r4(rec.ema),
                                                 "target": cfg.target.ema_dice}), *acts]
    judged = rules_tune.judge(s, now, cfg)
    return judged if judged is not None else (s, [])


def on_safe_point(s: Sup, ev, now, cfg):
    """safe point reached -> SIGINT (STOPPING)"""
    s = dataclasses.replace(s, writing=False, last_progress=now, final_phase=isinstance(ev, TrainingDone))
    why = f"{s.stop_reason.value if s.stop_reason else 'stop'}: checkpoint writes finished"
    if s.taking_over:
        why = "taking over: the other trainer's checkpoint writes finished"
    return stop(s, s.stop_reason or Reason.STOPPED, now, cfg, why)


def on_tick_safe_wait(s: Sup, ev, now, cfg):
    """past the checkpoint wait -> SIGINT anyway"""
    if s.safe_deadline is None or now < s.safe_deadline:
        return s, []
    return stop(s, s.stop_reason or Reason.STOPPED, now, cfg, "checkpoint wait timed out")


def on_tick_stopping(s: Sup, ev, now, cfg):
    """past stop.timeout_seconds -> SIGKILL; still there long after it -> FAILED (unkillable, named)"""
    if s.killed:
        if s.exited or s.kill_deadline is None or now < s.kill_deadline:
            return s, []
        return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                      f"attempt {s.attempt}'s trainer did not exit {criteria.REAP_LIMIT_S:g} s after SIGKILL (stuck in "
                      "uninterruptible I/O, or not ours to signal): giving up rather than waiting forever; find it "
                      "with `ps` and the attempt's pid in state.json", "error")
    if s.stop_deadline is None or now < s.stop_deadline:
        return s, []
    return _kill(s, now), [Log("stop_timeout", "warning", {"timeout_s": cfg.stop.timeout_seconds}),
                           SignalGroup(signal.SIGKILL)]


def _kill(s: Sup, now) -> Sup:
    return dataclasses.replace(s, killed=True, kill_deadline=now + criteria.REAP_LIMIT_S)


# ---- signals: criteria.signal_meaning says what each asks for; these rules say what it does now ----------
def _reload_or_ignore(s: Sup, ev: Signalled):
    """What every state does alike: SIGHUP re-reads the config, a signal that means nothing is logged."""
    meaning = criteria.signal_meaning(ev.signame, ev.in_slurm)
    if meaning == "reload":
        return s, [Reload()]
    if meaning == "ignore":
        return s, [Log("signal_ignored", fields={"signal": ev.signame, "why": "not inside a SLURM job"})]
    return None


def on_signal_running(s: Sup, ev: Signalled, now, cfg):
    """stop (operator) or requeue (SLURM) at the safe point; SIGHUP re-reads the config (PAUSED: SIGCONT first)"""
    if (early := _reload_or_ignore(s, ev)) is not None:
        return early
    cont = [SignalGroup(signal.SIGCONT)] if s.state == State.PAUSED else []
    s = resumed(s, now) if s.state == State.PAUSED else s
    preempt = criteria.signal_meaning(ev.signame, ev.in_slurm) == "preempt"
    s, acts = request_stop(s, Reason.PREEMPTED if preempt else Reason.STOPPED, now, cfg,
                           f"{ev.signame} to the supervisor" + (" (SLURM: time limit near or preemption)"
                                                                if preempt else ""),
                           cfg.stop.checkpoint_wait_seconds)
    return s, [Log("stop_requested", fields={"signal": ev.signame, "preempt": preempt}), *cont, *acts]


def on_signal_pending(s: Sup, ev: Signalled, now, cfg):
    """again while waiting: an operator/SLURM stop -> SIGINT now; our own stop -> noted, a second forces it"""
    if (early := _reload_or_ignore(s, ev)) is not None:
        return early
    if (s.stop_reason in (Reason.STOPPED, Reason.PREEMPTED) and not s.taking_over) or s.stop_asked:
        return stop(s, s.stop_reason or Reason.STOPPED, now, cfg,
                    f"{ev.signame} again: not waiting for the checkpoint write")
    # the supervisor's own stop (target, heat, a take-over, ...) already waits for the safe point: the first
    # request of the operator (or SLURM) must not truncate checkpoint_best.pth; a further one forces it
    return dataclasses.replace(s, stop_asked=True), [Log("stop_already_pending", fields={
        "signal": ev.signame, "reason": s.stop_reason.value if s.stop_reason else None,
        "hint": "send it again to stop without waiting for the checkpoint write"})]


def on_signal_stopping(s: Sup, ev: Signalled, now, cfg):
    """again while stopping: after an earlier request -> SIGKILL; else noted"""
    if (early := _reload_or_ignore(s, ev)) is not None:
        return early
    if s.killed:
        return s, []
    if not s.stop_asked and (s.stop_reason not in (Reason.STOPPED, Reason.PREEMPTED) or s.taking_over):
        return dataclasses.replace(s, stop_asked=True), [Log("stop_already_underway", fields={
            "signal": ev.signame, "hint": "send it again to kill the trainer now"})]
    return _kill(s, now), [Log("stop_escalated", "warning", {"signal": ev.signame}), SignalGroup(signal.SIGKILL)]


def on_signal_waiting(s: Sup, ev: Signalled, now, cfg):
    """nothing runs -> DONE (stopped); SLURM's signal -> requeue, so the wait resumes in the next run"""
    if (early := _reload_or_ignore(s, ev)) is not None:
        return early
    preempt = criteria.signal_meaning(ev.signame, ev.in_slurm) == "preempt"
    log = Log("stop_requested", fields={"signal": ev.signame, "preempt": preempt})
    if preempt:
        s = dataclasses.replace(s, last_reason=Reason.PREEMPTED, restart_at=None, disk_deadline=None)
        s, acts = _on_preempted(s, cfg)
        return s, [log, *acts]
    s, acts = finish(s, State.DONE, "stopped", ExitCode.OK, f"stopped by {ev.signame}")
    return s, [log, *acts]


def on_signal_requeuing(s: Sup, ev: Signalled, now, cfg):
    """the requeue is under way: a reload applies, a stop is noted (the job ends anyway)"""
    if criteria.signal_meaning(ev.signame, ev.in_slurm) == "reload":
        return s, [Reload()]
    return s, [Log("stop_already_underway", fields={"signal": ev.signame, "hint": "the job is being requeued"})]


# ---- SLURM ------------------------------------------------------------------------------------------------
def on_slurm_job_state(s: Sup, ev: SlurmJobState, now, cfg):
    """SLURM already ends the job (scancel, its own kill) -> DONE (stopped), never undone; else requeue"""
    if criteria.slurm_job_ending(ev.state):
        # a user's scancel sends the same SIGTERM as a preemption, and SLURM would still accept a requeue
        return finish(s, State.DONE, "stopped", ExitCode.OK,
                      f"stopped at a safe point; the job is already ending (JobState={ev.state}: cancelled with "
                      "scancel, or killed by SLURM itself); not requeued")
    return s, [Requeue()]


def on_requeued(s: Sup, ev: Requeued, now, cfg):
    """requeued -> DONE (preempted); refused -> FAILED (gave_up)"""
    if ev.result == "requeued":
        return finish(s, State.DONE, "preempted", ExitCode.OK,
                      f"stopped at a safe point and requeued (requeue {(s.slurm_restarts or 0) + 1}); "
                      "the next run continues with --c")
    return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                  f"stopped at a safe point, but the requeue failed: {ev.message}; resubmit the job to continue "
                  "with --c", "error")


