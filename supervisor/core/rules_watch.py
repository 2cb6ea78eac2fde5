"""Rules for watching a running attempt: progress lines, the hang rule, heat, a full disk, the bottleneck.

Each rule is pure: (sup, event, monotonic now, config in force) -> (sup', actions); states change only
through transition.py.
"""
from __future__ import annotations

import dataclasses
import signal

from supervisor.core import criteria, diagnose, rules_tune
from supervisor.core.actions import Diagnosed, Log, MeasureDisk, SignalGroup
from supervisor.core.classify import Reason
from supervisor.core.events import Activity, DiskSpace, EpochDone, Readings
from supervisor.core.exit_codes import ExitCode
from supervisor.core.record import State, Sup
from supervisor.core.transition import finish, request_stop, resumed, start_attempt, stop, track_epoch, transition


def on_epoch_started(s: Sup, ev, now, cfg):
    """progress; no checkpoint write in progress"""
    return dataclasses.replace(s, writing=False, final_phase=False, last_progress=now), []


def on_training_done(s: Sup, ev, now, cfg):
    """final validation begins (no hang detection)"""
    return dataclasses.replace(s, writing=False, final_phase=True, last_progress=now), []


def on_epoch_tracked(s: Sup, ev: EpochDone, now, cfg):
    """count the epoch (no new decision while stopping or paused)"""
    return track_epoch(s, ev.record), []


def on_activity(s: Sup, ev: Activity, now, cfg):
    """hang rule -> stop at once (nothing is being written); a hung final validation -> stop, rerun --val"""
    if not cfg.hang.enabled or s.last_progress is None:
        return s, []
    quiet = now - s.last_progress
    if s.final_phase or s.validate_only:
        limit = cfg.hang.final_validation_minutes * 60
        if not criteria.hung(quiet, limit, ev.cpu_share, ev.gpu_util, cfg):
            return s, []
        procs = criteria.fewer_export_procs(s.export_procs, cfg)
        s = dataclasses.replace(s, export_procs=procs, rerun_validation=True)
        s, acts = stop(s, Reason.HANG, now, cfg, f"the final validation made no progress for {quiet:.0f} s and its "
                                                 "processes are idle")
        return s, [Log("validation_hang_detected", "warning", {"quiet_s": round(quiet), "limit_s": round(limit),
                                                               "rerun": "--val", "nnUNet_def_n_proc": procs}), *acts]
    limit = criteria.hang_limit(s.epoch_times, s.epochs_this_attempt, cfg)
    if not criteria.hung(quiet, limit, ev.cpu_share, ev.gpu_util, cfg):
        return s, []
    s, acts = stop(s, Reason.HANG, now, cfg, f"no epoch progress for {quiet:.0f} s and the trainer is idle")
    return s, [Log("hang_detected", "warning", {"quiet_s": round(quiet), "limit_s": round(limit)}), *acts]


_THERMAL_STOPS = {"stop_hot": Reason.THERMAL_STOP, "stop_pause": Reason.THERMAL_STOP,
                  "stop_sensor": Reason.SENSOR_LOST, "gpu_lost": Reason.GPU_LOST}


def on_readings(s: Sup, ev: Readings, now, cfg):
    """thermal verdict: pause / resume / stop at the safe point / restart when cool / give up when the
    sensor stays lost while cooling"""
    temps = dict(ev.temps)
    failed = ev.error is not None or not temps or any(c is None for c in temps.values())
    s = dataclasses.replace(s, temps=temps, failed_reads=s.failed_reads + 1 if failed else 0)
    if s.state == State.COOLING:
        # A lost sensor must not keep a cooling run waiting forever: it can never say the GPU is cool.
        if not failed:
            s = dataclasses.replace(s, cool_deadline=now + cfg.thermal.max_pause_minutes * 60)
        elif s.cool_deadline is not None and now >= s.cool_deadline:
            return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                          f"no complete temperature reading for {cfg.thermal.max_pause_minutes:g} min "
                          "(thermal.max_pause_minutes) while waiting for the GPU to cool after a thermal stop: "
                          f"the supervisor cannot tell that it is cool ({ev.error or 'GPUs without a reading'}). "
                          "Check the sensor (nvidia-smi), then start again: training resumes with --c.", "error")
    v = criteria.thermal_verdict(s.state.value, temps, bool(ev.lost), now, cfg, s.paused_at, s.failed_reads)
    th, fields = cfg.thermal, {"temps": temps}
    if v == "pause" and s.state == State.RUNNING:
        s, ch = transition(s, State.PAUSED, "thermal_pause", {"temps": temps, "above": th.pause_celsius},
                           paused_at=now)
        return s, [ch, Log("thermal_pause", "warning", {**fields, "above": th.pause_celsius}),
                   SignalGroup(signal.SIGSTOP)]
    if v == "resume" and s.state == State.PAUSED:
        paused_s = round(now - s.paused_at, 1) if s.paused_at is not None else None
        s, ch = transition(resumed(s, now), State.RUNNING, "thermal_resume", {"temps": temps, "paused_s": paused_s})
        return s, [ch, Log("thermal_resume", fields={**fields, "paused_s": paused_s}), SignalGroup(signal.SIGCONT)]
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
        s = resumed(s, now) if s.state == State.PAUSED else s
        s, acts = request_stop(s, _THERMAL_STOPS[v], now, cfg, why, th.stop_wait_seconds)
        return s, [log, *cont, *acts]
    if v == "cooled" and s.state == State.COOLING:
        s, acts = start_attempt(dataclasses.replace(s, restart_counts=False), now, cfg, restart=True)
        return s, [Log("cooled", fields={**fields, "at_or_below": th.resume_celsius}), *acts]
    return s, []


def on_temps_only(s: Sup, ev: Readings, now, cfg):
    """record the temperatures"""
    return dataclasses.replace(s, temps=dict(ev.temps)), []


def on_disk_space(s: Sup, ev: DiskSpace, now, cfg):
    """room again -> resume with --c (not counted)"""
    needed = criteria.space_needed(ev.largest_checkpoint, ev.existing)
    s = dataclasses.replace(s, disk_needed=needed)
    if ev.free_bytes < needed:
        return s, []
    s, acts = start_attempt(dataclasses.replace(s, restart_counts=False), now, cfg, restart=True)
    return s, [Log("disk_space_ok", fields={"folder": ev.folder, "free_bytes": ev.free_bytes}), *acts]


def on_tick_no_space(s: Sup, ev, now, cfg):
    """measure the disk every 30 s; past the wait -> FAILED (gave_up)"""
    if s.disk_deadline is not None and now >= s.disk_deadline:
        return finish(s, State.FAILED, "gave_up", ExitCode.GAVE_UP,
                      f"the disk stayed full for {cfg.restart.disk_full_wait_minutes:g} min "
                      f"(restart.disk_full_wait_minutes); {s.disk_needed or 'unknown'} bytes are needed for the "
                      "next checkpoint. Free space, then start again: training resumes with --c.", "error")
    if s.next_disk_check is not None and now < s.next_disk_check:
        return s, []
    return dataclasses.replace(s, next_disk_check=now + criteria.DISK_CHECK_S), [MeasureDisk()]


def on_profiled(s: Sup, ev, now, cfg):
    """name the epoch's bottleneck; tell once when it changes to other than gpu_bound; data loading the limit
    -> try more workers once (rules_tune)"""
    v = diagnose.verdict(ev.profile, cfg)
    prev = (s.bottleneck or {}).get("kind")
    acts = ([Log("bottleneck", "warning", diagnose.log_fields(v)), Diagnosed(diagnose.log_fields(v))]
            if diagnose.changed(prev, v) else [])
    s = dataclasses.replace(s, bottleneck=v.to_json())
    trial = rules_tune.maybe_trial(s, v, now, cfg)
    if trial is not None:
        s, more = trial
        return s, acts + more
    return s, acts
