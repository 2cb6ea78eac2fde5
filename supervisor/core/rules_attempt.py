"""Rules for an attempt's life: start, choose the checkpoint, adopt another trainer, reap, judge the end.

Each rule is pure: (sup, event, monotonic now, config in force) -> (sup', actions); the first line of its
docstring is its line in the generated lifecycle (policy.lifecycle). States change only through
transition.py.
"""
from __future__ import annotations

import dataclasses
import signal

from supervisor.core import criteria
from supervisor.core import rules_fit
from supervisor.core import rules_remedy as remedies
from supervisor.core.actions import (Adopt, AttemptEnded, CollectExit, KillRemnants, Log, MoveAside, QuerySlurmJob,
                                     RemoveStaleTemps, SetBatchSize, SignalGroup, Spawn, StopLeftover)
from supervisor.core.classify import RESTARTABLE, Exit, Reason, classify, final_error
from supervisor.core.events import (ActionFailed, BatchSizeSet, CheckpointsInspected, ChildExited, Remnants, Start,
                                    TrainerExited)
from supervisor.core.exit_codes import ExitCode
from supervisor.core.record import ACTIVE, TERMINAL, State, Sup
from supervisor.core.transition import finish, resumed, start_attempt, transition

MAX_SAID = 400  # characters of the trainer's final error line in the run's last message


def on_start(s: Sup, ev: Start, now, cfg):
    """fresh decision: done, refuse or take over another trainer, --val, wait (backoff/cooling/disk), fit, start"""
    fitted = s.fit  # measured once per GPU, whatever the last run's end
    # A GPU fault seen by a run that died before its stop finished (watchdog, kill -9) is not forgotten: the
    # new run's health baseline already holds the fault, so it would never be reported again.
    faults = s.gpu_faults if s.state in ACTIVE else {}
    if s.state in TERMINAL or s.state in ACTIVE:
        # A new run of the supervisor decides afresh; the budget and what it changed carry over.
        s = Sup(state=s.state, attempt=s.attempt, restart_times=s.restart_times,
                consecutive_failures=s.consecutive_failures, original_batch_size=s.original_batch_size,
                n_proc_da=s.n_proc_da, oom_steps=s.oom_steps, paused_total=s.paused_total, restarts=s.restarts,
                restart_reasons=s.restart_reasons, export_procs=s.export_procs,
                compile_off=s.compile_off, workers_died=s.workers_died, tuning=s.tuning, gpu_faults=faults)
    acts = [StopLeftover(ev.leftover_pgid)] if ev.leftover_pgid else []
    workers = [x for x in (s.n_proc_da, ev.n_proc_da) if x is not None]
    n = min(workers) if workers else None  # an earlier reduction stays
    t = s.tuning or {}
    if t.get("phase") == "kept" and s.n_proc_da and ev.n_proc_da == t.get("from"):
        n = s.n_proc_da  # a kept worker trial stays too (or what a later halving left of it)
    s = dataclasses.replace(s, slurm_restarts=ev.slurm_restarts, batch_size=ev.batch_size,
                            original_batch_size=s.original_batch_size or ev.batch_size, n_proc_da=n)
    s = dataclasses.replace(s, fit=fitted, fit_deadline=None)  # a probe of a killed run is not ours to wait for
    if s.gpu_faults:
        s, more = remedies.unhealthy(s)
        return s, acts + more
    if ev.others:
        return _other_trainer(s, ev, now, cfg, acts)
    if ev.final_checkpoint and ev.validation_done:
        s, more = finish(s, State.DONE, "completed", ExitCode.OK,
                         "checkpoint_final.pth and the final validation exist: training already completed")
        return s, acts + more
    if ev.final_checkpoint:
        s, more = start_attempt(s, now, cfg, restart=False, validate_only=True)
        return s, acts + [Log("final_validation_missing", "warning",
                              {"action": "running nnU-Net's --val before calling it done"}), *more]
    if criteria.target_met(ev.last_epoch, cfg) and ev.best_checkpoint_ok:
        s, more = finish(s, State.DONE, "target_reached", ExitCode.OK,
                         f"target already reached at epoch {ev.last_epoch.epoch} (EMA {ev.last_epoch.ema:.4f})")
        return s, acts + more
    if s.state == State.COOLING and cfg.thermal.enabled:
        s = dataclasses.replace(s, cool_deadline=now + cfg.thermal.max_pause_minutes * 60)  # a new sensor
        return s, acts + [Log("still_cooling", "warning", {"resume_below": cfg.thermal.resume_celsius})]
    if s.state == State.NO_SPACE:
        return s, acts + [Log("still_waiting_for_disk_space", "warning", {"needed_bytes": s.disk_needed})]
    if s.state == State.BACKOFF and s.restart_at is not None:
        return s, acts + [Log("resuming_backoff", fields={"restart_in_s": round(max(0, s.restart_at - now), 1)})]
    fit, why_not = rules_fit.wanted(s, ev, cfg)
    if fit:
        return rules_fit.begin(s, ev, now, cfg, acts)
    if cfg.tune.batch_size_fit:
        acts.append(Log("batch_size_fit_skipped", fields={"why": why_not}))
    s, more = start_attempt(s, now, cfg, restart=False)
    return s, acts + more


def other_trainers_advice(others: tuple) -> str:
    """What to do about other trainers on the fold (`run` refusing, `check`, `status`): `--take-over` only for
    a trainer no other supervisor runs; a supervised one would be restarted by its supervisor (a fight)."""
    owners = sorted({o[2] for o in others if len(o) > 2 and o[2]})
    users = sorted({o[3] for o in others if len(o) > 3 and o[3]})
    if users and not owners:
        return (f"it runs as {', '.join(users)}, whose processes this supervisor may not signal (a service runs as "
                "its own user, without CAP_KILL), so `--take-over` cannot stop it either. Let it finish, or have "
                f"{', '.join(users)} or root stop it (Ctrl-C in its terminal: stock nnU-Net keeps what its last "
                "checkpoint_latest.pth holds), then start this one again: it continues from there with --c")
    if owners:
        return (f"it is supervised by another cardiacseg-train ({'; '.join(owners)}): stop that supervisor "
                "(Ctrl-C, `systemctl stop` for a service, or SIGTERM to its pid) and start this one again, or "
                "let that one finish. `--take-over` is refused: that supervisor would restart what this one "
                "stops, and the two would fight over the fold")
    return "stop it, or use `run --take-over` to stop it at its next safe point and continue with --c"


def _other_trainer(s: Sup, ev: Start, now, cfg, acts):
    """Another trainer runs on this fold: refuse (exit 2), or adopt it and stop it at its next safe point
    through the ordinary STOP_PENDING path; our own attempt then continues with --c. One that another
    supervisor runs is always refused: that supervisor would restart it; so is one of a user whose processes
    we may not signal: we could not stop it."""
    pids = tuple(o[0] for o in ev.others)
    named = "; ".join(f"pid {o[0]}{f' (user {o[3]})' if len(o) > 3 and o[3] else ''}: {o[1]}" for o in ev.others)
    supervised = any(len(o) > 2 and o[2] for o in ev.others)
    out_of_reach = any(len(o) > 3 and o[3] for o in ev.others)  # another user's: no signal of ours reaches it
    if not ev.take_over or supervised or out_of_reach:
        s, more = finish(s, State.FAILED, "config_error", ExitCode.CONFIG,
                         f"another trainer is already training this fold ({named}): refusing to start a second "
                         f"one on the same checkpoints; {other_trainers_advice(ev.others)}", "error")
        return s, acts + more
    wait = cfg.stop.checkpoint_wait_seconds
    # its checkpoint writes are unknown to us: wait for its next "Epoch N" / "Training done." line
    s, ch = transition(s, State.STOP_PENDING, Reason.STOPPED, {"take_over": list(pids)}, taking_over=True,
                       stop_reason=Reason.STOPPED, writing=True, safe_deadline=now + wait, last_progress=now)
    # SIGCONT: a trainer someone paused must run to reach its safe point
    return s, acts + [ch, Adopt(pids), Log("take_over_waiting_for_safe_point", "warning",
                                           {"pids": list(pids), "wait_s": wait}), SignalGroup(signal.SIGCONT)]


def on_checkpoints(s: Sup, ev: CheckpointsInspected, now, cfg):
    """choose what --c loads (bad ones moved aside) -> spawn; none readable -> fresh start or FAILED"""
    pick = criteria.choose_resume(ev.found, s.suspect)
    s = dataclasses.replace(s, suspect=None)  # judged once: the file is moved aside now
    acts: list = [RemoveStaleTemps(ev.stale_temps)] if ev.stale_temps else []
    if pick.bad and pick.resume_from is not None:
        lost = (ev.last_epoch - ev.best_epoch if "best" in pick.resume_from and ev.last_epoch is not None
                and ev.best_epoch is not None else None)
        acts.append(Log("checkpoint_fallback", "warning", {"resume_from": pick.resume_from, "epochs_lost": lost}))
    if pick.had_any and pick.resume_from is None:
        ck, minutes = cfg.checkpoint, None if ev.trained_s is None else ev.trained_s / 60
        epochs = "no epoch in the logs" if ev.last_epoch is None else f"epochs 0..{ev.last_epoch}"
        if not ck.allow_fresh_start and (minutes is None or minutes > ck.fresh_start_max_minutes):
            acts += [MoveAside(name, why) for name, why in pick.bad]
            trained = "an unknown amount of training" if minutes is None else f"{minutes:.1f} min of training"
            s, more = finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                             "every checkpoint in the fold folder was unreadable and has been moved aside "
                             f"(*.corrupt-*); starting again at epoch 0 would lose {trained} ({epochs}), more "
                             f"than checkpoint.fresh_start_max_minutes = {ck.fresh_start_max_minutes:g}. Put a good "
                             "checkpoint back, or set [checkpoint].allow_fresh_start = true (or raise "
                             "fresh_start_max_minutes) to start again from epoch 0", "error")
            return s, acts + more
        why = ("checkpoint.allow_fresh_start = true" if ck.allow_fresh_start else
               f"it loses only {minutes:.1f} min of training ({epochs}), at most "
               f"checkpoint.fresh_start_max_minutes = {ck.fresh_start_max_minutes:g}")
        acts.append(Log("fresh_start", "warning", {"why": f"no readable checkpoint left; {why}",
                                                   "lost_minutes": None if minutes is None else round(minutes, 1)}))
    s = dataclasses.replace(s, resume_from=pick.resume_from)
    # the moves travel with the Spawn: a file that cannot be moved aside means no trainer is started
    return s, acts + [Spawn(pick.resume_from, resume=pick.resume_from is not None and not s.validate_only,
                            validate_only=s.validate_only, move_aside=pick.bad)]


def on_checkpoints_paused(s: Sup, ev: CheckpointsInspected, now, cfg):
    """paused for heat before the trainer started: start it, and pause it at once"""
    s, acts = on_checkpoints(s, ev, now, cfg)
    return s, acts + ([SignalGroup(signal.SIGSTOP)] if any(isinstance(a, Spawn) for a in acts) else [])


def on_checkpoints_stopping(s: Sup, ev: CheckpointsInspected, now, cfg):
    """stopped before the trainer started: judged like an attempt that ended at our stop"""
    return on_exit(s, ChildExited(Exit(returncode=None, stderr_tail="stopped before the trainer was started")),
                   now, cfg)


def on_trainer_exited(s: Sup, ev: TrainerExited, now, cfg):
    """the trainer is gone: kill what is left of its attempt, reap it (bounded)"""
    return dataclasses.replace(s, exited=True, exit_after_stop=s.state == State.STOPPING,
                               reap_deadline=now + criteria.REAP_LIMIT_S), [KillRemnants()]


def on_remnants(s: Sup, ev: Remnants, now, cfg):
    """remnants gone (or the reap and GPU waits over) -> collect the exit"""
    if not s.exited or s.reap_deadline is None:
        return s, []
    acts = []
    if ev.alive or ev.streams_open:
        if now < s.reap_deadline:
            return s, []
        if ev.alive and not s.reap_overdue:
            s = dataclasses.replace(s, reap_overdue=True)
            acts.append(Log("group_not_empty", "error", {"alive": ev.alive, "waited_s": criteria.REAP_LIMIT_S}))
    if ev.gpu_holders:
        if s.gpu_deadline is None:
            s = dataclasses.replace(s, gpu_deadline=now + cfg.oom.gpu_release_timeout_seconds)
            return s, acts + [Log("waiting_for_gpu_memory", "warning", {"pids": list(ev.gpu_holders)})]
        if now < s.gpu_deadline:
            return s, acts
        acts.append(Log("gpu_memory_still_held", "error", {"pids": list(ev.gpu_holders),
                                                           "timeout_s": cfg.oom.gpu_release_timeout_seconds}))
    return dataclasses.replace(s, reap_deadline=None, gpu_deadline=None), acts + [CollectExit()]


def on_batch_size_set(s: Sup, ev: BatchSizeSet, now, cfg):
    """the plans file says the new size -> restart after the base backoff (not counted)"""
    s = dataclasses.replace(s, batch_size=ev.new, oom_steps=s.oom_steps + 1,
                            restart_at=now + cfg.restart.backoff_seconds, restart_counts=False)
    return s, [Log("batch_size_reduced", "warning", {"old": ev.old, "new": ev.new, "min": cfg.oom.min_batch_size,
                                                     "step": s.oom_steps}),
               Log("restart_scheduled", "warning", {"reason": Reason.CUDA_OOM.value,
                                                    "delay_s": cfg.restart.backoff_seconds, "counted": False})]


def on_action_failed(s: Sup, ev: ActionFailed, now, cfg):
    """-> FAILED (config_error, exit 2)"""
    return finish(s, State.FAILED, "config_error", ExitCode.CONFIG, ev.message, "error")


def on_tick_backoff(s: Sup, ev, now, cfg):
    """past restart_at -> the next attempt (--c; --val only after a hung final validation)"""
    if s.restart_at is None or now < s.restart_at:
        return s, []
    rerun = s.rerun_validation
    return start_attempt(dataclasses.replace(s, rerun_validation=False), now, cfg, restart=True, validate_only=rerun)


def on_exit(s: Sup, ev: ChildExited, now, cfg):
    """why it ended -> DONE / BACKOFF / COOLING / NO_SPACE / REQUEUING / FAILED; a taken-over trainer -> ours"""
    if s.state == State.PAUSED:
        s = resumed(s, now)
    if s.taking_over:
        return _taken_over(s, ev, now, cfg)
    # Only a stop we asked for (SIGINT sent before the exit) explains the exit; a death while waiting for the
    # safe point is judged on its own evidence (e.g. ENOSPC writing checkpoint_best.pth is not a target).
    ours = s.state == State.STOPPING and (s.exit_after_stop or not s.exited)
    x = dataclasses.replace(ev.exit, stop_intent=s.stop_reason if ours else None, we_killed=s.killed)
    reason = died_of = classify(x)
    if reason in (Reason.TARGET_REACHED, Reason.PLATEAU) and not ev.best_checkpoint_ok:
        reason = died_of = Reason.CRASH  # outcome target_reached promises a complete checkpoint_best.pth
    asked = s.stop_reason if s.stop_reason in (Reason.STOPPED, Reason.PREEMPTED) else (
        Reason.STOPPED if s.stop_asked else None)
    if asked is not None and reason not in (Reason.COMPLETED, Reason.TARGET_REACHED, Reason.PLATEAU,
                                            Reason.DIVERGED, Reason.CONFIG_ERROR):
        reason = asked  # someone asked for the stop: a trainer that died meanwhile is not restarted
    s = dataclasses.replace(s, last_reason=reason, stop_deadline=None, safe_deadline=None, stop_reason=None,
                            writing=False, exited=False, reap_deadline=None, gpu_deadline=None,
                            suspect=s.resume_from if reason == Reason.CORRUPT_CHECKPOINT else None)
    ended = AttemptEnded(s.attempt, reason.value, x.returncode, expected=reason not in RESTARTABLE,
                         evidence=died_of.value)
    s, acts = _after(s, reason, now, cfg, said=final_error_line(x.stderr_tail), log=ev.log)
    return s, [ended, *acts]


def final_error_line(tail: str) -> str:
    """The line a person needs from the trainer's last words: the final exception (classify.final_error),
    else the last line it wrote; long lines cut (nnU-Net's come first in them)."""
    err = final_error(tail)
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[0] if err != tail else lines[-1]
    return line if len(line) <= MAX_SAID else line[:MAX_SAID - 3] + "..."


def _taken_over(s: Sup, ev: ChildExited, now, cfg):
    # the adopted trainer's attempt ends like any other: one attempt_ended line, saying how it went
    ended = AttemptEnded(s.attempt, Reason.STOPPED.value, ev.exit.returncode, expected=True,
                         evidence=_how_it_ended(s, ev, cfg))
    s = dataclasses.replace(s, taking_over=False, stop_reason=None, exited=False, reap_deadline=None,
                            gpu_deadline=None, writing=False)
    if s.stop_asked:  # the operator asked to stop meanwhile: stop, do not start our own
        s, acts = finish(s, State.DONE, "stopped", ExitCode.OK, "the other trainer was stopped; stopped on request")
        return s, [ended, Log("take_over_done", "warning", {"then": "stopped"}), *acts]
    if s.gpu_faults:  # hardware errors seen while the other trainer was being stopped: not on that GPU
        s, acts = remedies.unhealthy(s)
        return s, [ended, Log("take_over_done", "warning", {"then": "gpu_unhealthy"}), *acts]
    s, acts = start_attempt(s, now, cfg, restart=False, cause="take_over")
    return s, [ended, Log("take_over_done", "warning", {"then": "continuing with --c"}), *acts]


def _how_it_ended(s: Sup, ev: ChildExited, cfg) -> str:
    """How the trainer we took over ended, for the log: it is not our child, so its exit status is unknown;
    what we sent it, and when it went, tell."""
    if s.killed:
        return (f"it ignored SIGINT for stop.timeout_seconds = {cfg.stop.timeout_seconds:g} s (started with nohup "
                "or by a script? those ignore SIGINT): killed with SIGKILL; the checkpoint --c loads is verified "
                "first, as at every start")
    if s.state == State.STOPPING and (s.exit_after_stop or not s.exited):
        return "it stopped on SIGINT at its safe point (after its checkpoint writes)"
    said = final_error_line(ev.exit.stderr_tail)
    return "it ended by itself before its safe point" + (f": {said}" if said else "")


def _after(s: Sup, reason: Reason, now, cfg, said: str = "", log: str | None = None):
    """What follows an attempt that ended for `reason` (`said`: the trainer's final error line; `log`: the
    attempt's log)."""
    if reason == Reason.DIVERGED:
        return finish(s, State.FAILED, "diverged", ExitCode.GAVE_UP, remedies.diverged_message(s), "error")
    if reason == Reason.PREEMPTED:
        return _on_preempted(s, cfg)
    if reason in (Reason.COMPLETED, Reason.TARGET_REACHED, Reason.STOPPED, Reason.PLATEAU):
        return finish(s, State.DONE, reason.value, ExitCode.OK, f"attempt {s.attempt}: {reason.value}")
    if reason == Reason.CONFIG_ERROR:
        return finish(s, State.FAILED, "config_error", ExitCode.CONFIG,
                      "the trainer reported a configuration error" + (f": {said}" if said else "")
                      + (f"; its whole output is in {log}" if log else "") + "; restarting cannot help", "error")
    s, acts = remedies.remedy(s, reason, now, cfg, said)
    if acts is not None:
        return s, acts
    if reason in (Reason.THERMAL_STOP, Reason.SENSOR_LOST):
        s, ch = transition(s, State.COOLING, reason, {"resume_below": cfg.thermal.resume_celsius, "temps": s.temps},
                           cool_deadline=now + cfg.thermal.max_pause_minutes * 60)
        return s, [ch, Log("cooling", "warning", {"reason": reason.value, "resume_below": cfg.thermal.resume_celsius,
                                                  "temps": s.temps})]
    if reason == Reason.DISK_FULL and cfg.restart.disk_full_wait_minutes > 0:
        s, ch = transition(s, State.NO_SPACE, reason, {"wait_minutes": cfg.restart.disk_full_wait_minutes},
                           disk_deadline=now + cfg.restart.disk_full_wait_minutes * 60, next_disk_check=now)
        return s, [ch, Log("disk_full", "error", {"wait_minutes": cfg.restart.disk_full_wait_minutes,
                                                  "checkpoints": "kept"})]
    if reason == Reason.CUDA_OOM and cfg.oom.enabled and s.batch_size is not None:
        return _on_cuda_oom(s, now, cfg)
    recent = criteria.restarts_in_window(s.restart_times, now, cfg)
    if len(recent) >= cfg.restart.max_restarts:
        s = dataclasses.replace(s, restart_times=recent)
        return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                      f"{len(recent)} restarts within {cfg.restart.window_minutes:g} min "
                      f"(restart.max_restarts = {cfg.restart.max_restarts}); last reason: {reason.value}"
                      + (f". {remedies.ADVICE[reason]}" if reason in remedies.ADVICE else ""), "error")
    failures = 1 if s.progress else s.consecutive_failures + 1
    delay = criteria.backoff_delay(failures, cfg)
    s, ch = transition(s, State.BACKOFF, reason, {"delay_s": round(delay, 1), "restart": s.restarts + 1,
                                                  "budget_used": len(recent) + 1,
                                                  "max_restarts": cfg.restart.max_restarts, "counted": True},
                       restart_at=now + delay, restart_times=recent, consecutive_failures=failures,
                       restart_counts=True)
    return s, [ch, Log("restart_scheduled", "warning", {"reason": reason.value, "delay_s": round(delay, 1),
                                                        "restart": s.restarts + 1, "budget_used": len(recent) + 1,
                                                        "max_restarts": cfg.restart.max_restarts})]


def _on_preempted(s: Sup, cfg):
    n = s.slurm_restarts or 0
    if n >= cfg.slurm.max_requeues:
        return finish(s, State.DONE, "preempted", ExitCode.OK,
                      f"stopped for SLURM after {n} requeues (slurm.max_requeues = {cfg.slurm.max_requeues}); "
                      "not requeued again: resubmit the job to continue with --c")
    s, ch = transition(s, State.REQUEUING, Reason.PREEMPTED, {"requeue": n + 1})
    return s, [ch, QuerySlurmJob()]


def _on_cuda_oom(s: Sup, now, cfg):
    o, bs = cfg.oom, s.batch_size
    new = criteria.next_batch_size(bs, o.min_batch_size, o.strategy, o.subtract, o.factor)
    if new is None:
        tried = " -> ".join(str(b) for b in criteria.step_sequence(s.original_batch_size or bs, o.min_batch_size,
                                                                  o.strategy, o.subtract, o.factor))
        return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                      f"CUDA out of memory at the minimum batch size {bs} (batch sizes tried: {tried}). What can "
                      "help: free the GPU of other processes (nvidia-smi), a smaller patch size or the 3d_lowres "
                      "configuration (a new plans/configuration), or a lower [oom].min_batch_size.", "error")
    # BACKOFF without a restart time: the restart is scheduled once the plans file says `new` (BatchSizeSet)
    s, ch = transition(s, State.BACKOFF, Reason.CUDA_OOM, {"old": bs, "new": new, "restart": s.restarts + 1,
                                                           "counted": False},
                       restart_at=None, restart_counts=False)
    return s, [ch, SetBatchSize(bs, new)]
