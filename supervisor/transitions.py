"""The transition rules: one function per (state, event) behaviour, referenced by policy.TABLE.

Each rule is pure: (sup, event, monotonic now, config in force) -> (sup', actions). The first line of
each docstring is the rule's summary in the generated lifecycle (policy.lifecycle, State.__doc__).
"""
from __future__ import annotations

import dataclasses
import signal

from . import diagnose, rules
from .classify import RESTARTABLE, Reason, classify
from .events import (ActionFailed, Activity, BatchSizeSet, ChildExited, DiskSpace, EpochDone, ExitCode, Log,
                     MeasureDisk, NoCheckpoint, Readings, Reconfigured, Requeue, Requeued, SetBatchSize, SetWorkers, SignalGroup,
                     Start, StopLeftover, StopRequested, TrainingDone)
from .sup import (ACTIVE, TERMINAL, State, Sup, _finish, _r, _request_stop, _resumed, _spawn, _stop,
                  _track_epoch)

DISK_CHECK_S = 30.0


def ignored(s, ev, now, cfg):
    """ignored"""
    return s, []





def on_start(s: Sup, ev: Start, now, cfg):
    """fresh decision: done, --val, wait (backoff/cooling/disk) or spawn"""
    if s.state in TERMINAL or s.state in ACTIVE:
        # A new run of the supervisor decides afresh; the budget and what it changed carry over.
        s = Sup(attempt=s.attempt, restart_times=s.restart_times, consecutive_failures=s.consecutive_failures,
                original_batch_size=s.original_batch_size, n_proc_da=s.n_proc_da, oom_steps=s.oom_steps,
                paused_total=s.paused_total)
    acts = [StopLeftover(ev.leftover_pgid)] if ev.leftover_pgid else []
    s = dataclasses.replace(s, slurm_restarts=ev.slurm_restarts)
    workers = [x for x in (s.n_proc_da, ev.n_proc_da) if x is not None]
    s = dataclasses.replace(s, batch_size=ev.batch_size, original_batch_size=s.original_batch_size or ev.batch_size,
                            n_proc_da=min(workers) if workers else None)  # an earlier reduction stays
    if ev.final_checkpoint and ev.validation_done:
        s, more = _finish(s, State.DONE, "completed", ExitCode.OK,
                          "checkpoint_final.pth and the final validation exist: training already completed")
        return s, acts + more
    if ev.final_checkpoint:
        s, more = _spawn(s, now, restart=False, validate_only=True)
        return s, acts + [Log("final_validation_missing", "warning",
                              {"action": "running nnU-Net's --val before calling it done"}), *more]
    if rules.target_met(ev.last_epoch, cfg) and ev.best_checkpoint_ok:
        s, more = _finish(s, State.DONE, "target_reached", ExitCode.OK,
                          f"target already reached at epoch {ev.last_epoch.epoch} (EMA {ev.last_epoch.ema:.4f})")
        return s, acts + more
    if s.state == State.COOLING and cfg.thermal.enabled:
        return s, acts + [Log("still_cooling", "warning", {"resume_below": cfg.thermal.resume_celsius})]
    if s.state == State.NO_SPACE:
        return s, acts + [Log("still_waiting_for_disk_space", "warning", {"needed_bytes": s.disk_needed})]
    if s.state == State.BACKOFF and s.restart_at is not None:
        return s, acts + [Log("resuming_backoff", fields={"restart_in_s": round(max(0, s.restart_at - now), 1)})]
    s, more = _spawn(s, now, restart=False)
    return s, acts + more


def on_reconfigured(s: Sup, ev: Reconfigured, now, cfg):
    """a lowered target met by the last epoch -> stop at the safe point"""
    if not rules.target_met(ev.last_epoch, cfg):
        return s, []
    s, acts = _request_stop(s, Reason.TARGET_REACHED, now, cfg, "target reached (lowered by reload)",
                            cfg.stop.checkpoint_wait_seconds)
    return s, [Log("target_reached", fields={"epoch": ev.last_epoch.epoch, "ema": _r(ev.last_epoch.ema),
                                             "target": cfg.target.ema_dice, "via": "reload"}), *acts]


def on_epoch_started(s: Sup, ev, now, cfg):
    """progress; no checkpoint write in progress"""
    return dataclasses.replace(s, writing=False, final_phase=False, last_progress=now), []


def on_safe_point(s: Sup, ev, now, cfg):
    """safe point reached -> SIGINT (STOPPING)"""
    s = dataclasses.replace(s, writing=False, last_progress=now, final_phase=isinstance(ev, TrainingDone))
    why = f"{s.stop_reason.value if s.stop_reason else 'stop'}: checkpoint writes finished"
    return _stop(s, s.stop_reason or Reason.STOPPED, now, cfg, why)


def on_training_done(s: Sup, ev, now, cfg):
    """final validation begins (no hang detection)"""
    return dataclasses.replace(s, writing=False, final_phase=True, last_progress=now), []


def on_epoch_tracked(s: Sup, ev: EpochDone, now, cfg):
    """count the epoch (no new decision while stopping or paused)"""
    return _track_epoch(s, ev.record), []


def on_epoch_done(s: Sup, ev: EpochDone, now, cfg):
    """divergence / plateau / target -> stop at the safe point"""
    s, rec, wait = _track_epoch(s, ev.record), ev.record, cfg.stop.checkpoint_wait_seconds
    if cfg.target.max_nonfinite_epochs and s.nonfinite_streak >= cfg.target.max_nonfinite_epochs:
        s, acts = _request_stop(s, Reason.DIVERGED, now, cfg,
                                f"non-finite loss or Dice for {s.nonfinite_streak} epochs in a row", wait)
        return s, [Log("diverged", "error", {"epoch": rec.epoch, "train_loss": rec.train_loss,
                                             "streak": s.nonfinite_streak}), *acts]
    if cfg.target.patience_epochs and s.since_best >= cfg.target.patience_epochs:
        s, acts = _request_stop(s, Reason.PLATEAU, now, cfg, "no new best EMA", wait)
        return s, [Log("plateau", fields={"epoch": rec.epoch, "epochs_without_new_best": s.since_best}), *acts]
    if rules.target_met(rec, cfg):
        s, acts = _request_stop(s, Reason.TARGET_REACHED, now, cfg, "target reached", wait)
        return s, [Log("target_reached", fields={"epoch": rec.epoch, "ema": _r(rec.ema),
                                                 "target": cfg.target.ema_dice}), *acts]
    return s, []


def on_activity(s: Sup, ev: Activity, now, cfg):
    """hang rule -> stop at once (nothing is being written)"""
    if not cfg.hang.enabled or s.final_phase or s.validate_only or s.last_progress is None:
        return s, []
    quiet = now - s.last_progress
    limit = rules.hang_limit(s.epoch_times, s.epochs_this_attempt, cfg)
    if not rules.hung(quiet, limit, ev.cpu_share, ev.gpu_util, cfg):
        return s, []
    s, acts = _stop(s, Reason.HANG, now, cfg, f"no epoch progress for {quiet:.0f} s and the trainer is idle")
    return s, [Log("hang_detected", "warning", {"quiet_s": round(quiet), "limit_s": round(limit)}), *acts]


_THERMAL_STOPS = {"stop_hot": Reason.THERMAL_STOP, "stop_pause": Reason.THERMAL_STOP,
                  "stop_sensor": Reason.SENSOR_LOST, "gpu_lost": Reason.GPU_LOST}


def on_readings(s: Sup, ev: Readings, now, cfg):
    """thermal verdict: pause / resume / stop at the safe point / restart when cool"""
    temps = dict(ev.temps)
    failed = ev.error is not None or not temps or any(c is None for c in temps.values())
    s = dataclasses.replace(s, temps=temps, failed_reads=s.failed_reads + 1 if failed else 0)
    v = rules.thermal_verdict(s.state.value, temps, bool(ev.lost), now, cfg, s.paused_at, s.failed_reads)
    th, fields = cfg.thermal, {"temps": temps}
    if v == "pause" and s.state == State.RUNNING:
        s = dataclasses.replace(s, state=State.PAUSED, paused_at=now)
        return s, [Log("thermal_pause", "warning", {**fields, "above": th.pause_celsius}), SignalGroup(signal.SIGSTOP)]
    if v == "resume" and s.state == State.PAUSED:
        paused_s = round(now - s.paused_at, 1) if s.paused_at is not None else None
        return _resumed(s, now), [Log("thermal_resume", fields={**fields, "paused_s": paused_s}),
                                  SignalGroup(signal.SIGCONT)]
    if v in _THERMAL_STOPS:
        why = {"stop_hot": f"GPU too hot (stop at {th.stop_celsius:g} C; a multi-GPU run is never paused)",
               "stop_pause": f"paused longer than {th.max_pause_minutes:g} min",
               "stop_sensor": f"no temperature readings for {s.failed_reads} polls",
               "gpu_lost": "NVML reports the GPU lost"}[v]
        log = Log("thermal_stop", "error" if v == "gpu_lost" else "warning", {**fields, "why": why})
        if s.state == State.STOP_PENDING:  # already stopping: keep the reason, but do not wait long in heat
            deadline = min(s.safe_deadline or now, now + th.stop_wait_seconds)
            return dataclasses.replace(s, safe_deadline=deadline), [log]
        cont = [SignalGroup(signal.SIGCONT)] if s.state == State.PAUSED else []
        s = _resumed(s, now) if s.state == State.PAUSED else s
        s, acts = _request_stop(s, _THERMAL_STOPS[v], now, cfg, why, th.stop_wait_seconds)
        return s, [log, *cont, *acts]
    if v == "cooled" and s.state == State.COOLING:
        s, acts = _spawn(dataclasses.replace(s, restart_counts=False), now, restart=True)
        return s, [Log("cooled", fields={**fields, "at_or_below": th.resume_celsius}), *acts]
    return s, []


def on_temps_only(s: Sup, ev: Readings, now, cfg):
    """record the temperatures"""
    return dataclasses.replace(s, temps=dict(ev.temps)), []


def on_disk_space(s: Sup, ev: DiskSpace, now, cfg):
    """room again -> resume with --c (not counted)"""
    s = dataclasses.replace(s, disk_needed=ev.needed_bytes)
    if ev.free_bytes < ev.needed_bytes:
        return s, []
    s, acts = _spawn(dataclasses.replace(s, restart_counts=False), now, restart=True)
    return s, [Log("disk_space_ok", fields={"folder": ev.folder, "free_bytes": ev.free_bytes}), *acts]


def on_profiled(s: Sup, ev, now, cfg):
    """name the epoch's bottleneck; warn once when it changes to other than gpu_bound"""
    v = diagnose.verdict(ev.profile, cfg)
    prev = (s.bottleneck or {}).get("kind")
    acts = [Log("bottleneck", "warning", diagnose.log_fields(v))] if diagnose.changed(prev, v) else []
    return dataclasses.replace(s, bottleneck=v.to_json()), acts


def on_no_checkpoint(s: Sup, ev: NoCheckpoint, now, cfg):
    """-> FAILED (gave_up, exit 3)"""
    return _finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP, ev.message, "error")


def on_batch_size_set(s: Sup, ev: BatchSizeSet, now, cfg):
    """the plans file says the new size -> restart after the base backoff (not counted)"""
    s = dataclasses.replace(s, batch_size=ev.new, oom_steps=s.oom_steps + 1, restart_at=now + cfg.restart.backoff_seconds,
                            restart_counts=False)
    return s, [Log("batch_size_reduced", "warning", {"old": ev.old, "new": ev.new, "min": cfg.oom.min_batch_size,
                                                     "step": s.oom_steps}),
               Log("restart_scheduled", "warning", {"reason": Reason.CUDA_OOM.value,
                                                    "delay_s": cfg.restart.backoff_seconds, "counted": False})]


def on_action_failed(s: Sup, ev: ActionFailed, now, cfg):
    """-> FAILED (config_error, exit 2)"""
    return _finish(s, State.FAILED, "config_error", ExitCode.CONFIG, ev.message, "error")


def on_exit(s: Sup, ev: ChildExited, now, cfg):
    """why it ended -> DONE / BACKOFF / COOLING / NO_SPACE / FAILED"""
    st = s.state
    if st == State.PAUSED:
        s = _resumed(s, now)
    # Only a stop we asked for (SIGINT sent) explains the exit; a death while waiting for the safe point
    # is judged on its own evidence (e.g. ENOSPC writing checkpoint_best.pth is not a target reached).
    ours = st == State.STOPPING and ev.after_our_stop is not False
    x = dataclasses.replace(ev.exit, stop_intent=s.stop_reason if ours else None, we_killed=s.killed)
    reason = classify(x)
    if reason in (Reason.TARGET_REACHED, Reason.PLATEAU) and not ev.best_checkpoint_ok:
        reason = Reason.CRASH  # outcome target_reached promises a complete checkpoint_best.pth
    s = dataclasses.replace(s, last_reason=reason, stop_deadline=None, safe_deadline=None, stop_reason=None,
                            writing=False)
    ended = Log("attempt_ended", "info" if reason not in RESTARTABLE else "warning",
                {"attempt": s.attempt, "reason": reason.value, "exit_code": x.returncode})
    if reason == Reason.DIVERGED:
        s, acts = _finish(s, State.FAILED, "diverged", ExitCode.GAVE_UP,
                          f"training diverged: non-finite loss or pseudo Dice for {s.nonfinite_streak} epochs in a "
                          "row. Not restarted into the same divergence: check the data and the learning rate, move "
                          "the bad checkpoints aside, then start again.", "error")
        return s, [ended, *acts]
    if reason == Reason.PREEMPTED:
        return _on_preempted(s, ended, cfg)
    if reason in (Reason.COMPLETED, Reason.TARGET_REACHED, Reason.STOPPED, Reason.PLATEAU):
        s, acts = _finish(s, State.DONE, reason.value, ExitCode.OK, f"attempt {s.attempt}: {reason.value}")
        return s, [ended, *acts]
    if reason == Reason.CONFIG_ERROR:
        s, acts = _finish(s, State.FAILED, "config_error", ExitCode.CONFIG,
                          "the trainer reported a configuration error (its stderr is in the attempt's log); "
                          "restarting cannot help", "error")
        return s, [ended, *acts]
    if reason in (Reason.THERMAL_STOP, Reason.SENSOR_LOST):
        s = dataclasses.replace(s, state=State.COOLING)
        return s, [ended, Log("cooling", "warning", {"reason": reason.value,
                                                     "resume_below": cfg.thermal.resume_celsius, "temps": s.temps})]
    if reason == Reason.DISK_FULL and cfg.restart.disk_full_wait_minutes > 0:
        s = dataclasses.replace(s, state=State.NO_SPACE, disk_deadline=now + cfg.restart.disk_full_wait_minutes * 60,
                                next_disk_check=now)
        return s, [ended, Log("disk_full", "error", {"wait_minutes": cfg.restart.disk_full_wait_minutes,
                                                     "checkpoints": "kept"})]
    if reason == Reason.CUDA_OOM and cfg.oom.enabled and s.batch_size is not None:
        return _on_cuda_oom(s, now, cfg, ended)
    if reason == Reason.HOST_OOM and s.n_proc_da is not None and s.n_proc_da > 1:
        old, new = s.n_proc_da, max(1, s.n_proc_da // 2)
        s = dataclasses.replace(s, n_proc_da=new, state=State.BACKOFF, restart_counts=False,
                                restart_at=now + cfg.restart.backoff_seconds)
        return s, [ended, SetWorkers(old, new),
                   Log("workers_reduced", "warning", {"variable": "nnUNet_n_proc_DA", "old": old, "new": new}),
                   Log("restart_scheduled", "warning", {"reason": reason.value, "delay_s": cfg.restart.backoff_seconds,
                                                        "counted": False})]
    recent = rules.restarts_in_window(s.restart_times, now, cfg)
    if len(recent) >= cfg.restart.max_restarts:
        s = dataclasses.replace(s, restart_times=recent)
        s, acts = _finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                          f"{len(recent)} restarts within {cfg.restart.window_minutes:g} min "
                          f"(restart.max_restarts = {cfg.restart.max_restarts}); last reason: {reason.value}", "error")
        return s, [ended, *acts]
    failures = 1 if s.progress else s.consecutive_failures + 1
    delay = rules.backoff_delay(failures, cfg)
    s = dataclasses.replace(s, state=State.BACKOFF, restart_at=now + delay, restart_times=recent,
                            consecutive_failures=failures, restart_counts=True)
    return s, [ended, Log("restart_scheduled", "warning", {"reason": reason.value, "delay_s": round(delay, 1),
                                                           "restart": len(recent) + 1,
                                                           "max_restarts": cfg.restart.max_restarts})]


def _on_preempted(s: Sup, ended: Log, cfg):
    n = s.slurm_restarts or 0
    if n >= cfg.slurm.max_requeues:
        s, acts = _finish(s, State.DONE, "preempted", ExitCode.OK,
                          f"stopped for SLURM after {n} requeues (slurm.max_requeues = {cfg.slurm.max_requeues}); "
                          "not requeued again: resubmit the job to continue with --c")
        return s, [ended, *acts]
    s = dataclasses.replace(s, state=State.REQUEUING)
    return s, [ended, Requeue()]


def on_requeued(s: Sup, ev: Requeued, now, cfg):
    """requeued -> DONE (preempted); SLURM ends the job anyway -> DONE (stopped); refused -> FAILED"""
    if ev.result == "requeued":
        return _finish(s, State.DONE, "preempted", ExitCode.OK,
                       f"stopped at a safe point and requeued (requeue {(s.slurm_restarts or 0) + 1}); "
                       "the next run continues with --c")
    if ev.result == "ending":  # a user's scancel sends the same SIGTERM as a preemption: never undo it
        return _finish(s, State.DONE, "stopped", ExitCode.OK, f"stopped at a safe point; {ev.message}")
    return _finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                   f"stopped at a safe point, but the requeue failed: {ev.message}; resubmit the job to continue "
                   "with --c", "error")


def _on_cuda_oom(s: Sup, now, cfg, ended: Log):
    o, bs = cfg.oom, s.batch_size
    new = rules.next_batch_size(bs, o.min_batch_size, o.strategy, o.subtract, o.factor)
    if new is None:
        tried = " -> ".join(str(b) for b in rules.step_sequence(s.original_batch_size or bs, o.min_batch_size, o.strategy,
                                                          o.subtract, o.factor))
        s, acts = _finish(
            s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
            f"CUDA out of memory at the minimum batch size {bs} (batch sizes tried: {tried}). What can help: free "
            "the GPU of other processes (nvidia-smi), a smaller patch size or the 3d_lowres configuration (a new "
            "plans/configuration), or a lower [oom].min_batch_size.", "error")
        return s, [ended, *acts]
    # BACKOFF without a restart time: the restart is scheduled once the plans file says `new` (BatchSizeSet)
    s = dataclasses.replace(s, state=State.BACKOFF, restart_at=None, restart_counts=False)
    return s, [ended, SetBatchSize(bs, new)]


def on_stop_requested(s: Sup, ev: StopRequested, now, cfg):
    """operator stop or SLURM preemption -> at the safe point (PAUSED: SIGCONT first)"""
    cont = [SignalGroup(signal.SIGCONT)] if s.state == State.PAUSED else []
    s = _resumed(s, now) if s.state == State.PAUSED else s
    reason = Reason.PREEMPTED if ev.preempt else Reason.STOPPED
    s, acts = _request_stop(s, reason, now, cfg, f"{ev.signame} to the supervisor"
                            + (" (SLURM: time limit near or preemption)" if ev.preempt else ""),
                            cfg.stop.checkpoint_wait_seconds)
    return s, [Log("stop_requested", fields={"signal": ev.signame, "preempt": ev.preempt}), *cont, *acts]


def on_stop_forced(s: Sup, ev: StopRequested, now, cfg):
    """another stop request while waiting: ours (operator/SLURM) -> SIGINT now; else note it, keep waiting"""
    if s.stop_reason in (Reason.STOPPED, Reason.PREEMPTED) or s.stop_asked:
        return _stop(s, s.stop_reason or Reason.STOPPED, now, cfg,
                     f"{ev.signame} again: not waiting for the checkpoint write")
    # the supervisor's own stop (target, heat, ...) already waits for the safe point: the first request
    # of the operator (or SLURM) must not truncate checkpoint_best.pth; a further one forces it
    return dataclasses.replace(s, stop_asked=True), [Log("stop_already_pending", fields={
        "signal": ev.signame, "reason": s.stop_reason.value if s.stop_reason else None,
        "hint": "send it again to stop without waiting for the checkpoint write"})]


def on_stop_escalated(s: Sup, ev: StopRequested, now, cfg):
    """another stop request while stopping: after an earlier one -> SIGKILL; else note it"""
    if s.killed:
        return s, []
    if not s.stop_asked and s.stop_reason not in (Reason.STOPPED, Reason.PREEMPTED):
        return dataclasses.replace(s, stop_asked=True), [Log("stop_already_underway", fields={
            "signal": ev.signame, "hint": "send it again to kill the trainer now"})]
    return dataclasses.replace(s, killed=True), [Log("stop_escalated", "warning", {"signal": ev.signame}),
                                                 SignalGroup(signal.SIGKILL)]


def on_stop_idle(s: Sup, ev: StopRequested, now, cfg):
    """nothing runs -> DONE (stopped); SLURM's signal -> requeue, so waiting resumes in the next run"""
    if ev.preempt:
        s = dataclasses.replace(s, last_reason=Reason.PREEMPTED, restart_at=None, disk_deadline=None)
        return _on_preempted(s, Log("stop_requested", fields={"signal": ev.signame, "preempt": True}), cfg)
    return _finish(s, State.DONE, "stopped", ExitCode.OK, f"stopped by {ev.signame}")


def on_tick_safe_wait(s: Sup, ev, now, cfg):
    """past the checkpoint wait -> SIGINT anyway"""
    if s.safe_deadline is None or now < s.safe_deadline:
        return s, []
    return _stop(s, s.stop_reason or Reason.STOPPED, now, cfg, "checkpoint wait timed out")


def on_tick_stopping(s: Sup, ev, now, cfg):
    """past stop.timeout_seconds -> SIGKILL"""
    if s.killed or s.stop_deadline is None or now < s.stop_deadline:
        return s, []
    return dataclasses.replace(s, killed=True), [Log("stop_timeout", "warning", {"timeout_s": cfg.stop.timeout_seconds}),
                                                 SignalGroup(signal.SIGKILL)]


def on_tick_backoff(s: Sup, ev, now, cfg):
    """past restart_at -> spawn with --c"""
    if s.restart_at is None or now < s.restart_at:
        return s, []
    return _spawn(s, now, restart=True)


def on_tick_no_space(s: Sup, ev, now, cfg):
    """measure the disk every 30 s; past the wait -> FAILED (gave_up)"""
    if s.disk_deadline is not None and now >= s.disk_deadline:
        return _finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                       f"the disk stayed full for {cfg.restart.disk_full_wait_minutes:g} min "
                       f"(restart.disk_full_wait_minutes); {s.disk_needed or 'unknown'} bytes are needed for the "
                       "next checkpoint. Free space, then start again: training resumes with --c.", "error")
    if s.next_disk_check is not None and now < s.next_disk_check:
        return s, []
    return dataclasses.replace(s, next_disk_check=now + DISK_CHECK_S), [MeasureDisk()]


