"""What a notification says: which of the policy's decisions a person hears about, and the message.

How it works: `notice_for(item)` maps a decision to a notification kind and its fields (see notify.py's
docstring for the list); `body(kind, fields, snap)` builds the JSON a webhook receives from them and the
last state snapshot (event, message, dataset, configuration, fold, epoch, ema_dice, best_ema_dice,
batch_size, restarts, host, time, details). Messages say what the policy decided, in its own words for
final outcomes (Sup.message), never what it might do. Pure: no I/O but the host name and the clock.
"""
from __future__ import annotations

import math
import socket
import time
from datetime import datetime, timezone

_INTO_DONE = {"completed": "completed", "target_reached": "target_reached", "preempted": "preempted"}
_INTO_FAILED = {"gave_up": "gave_up", "config_error": "config_error", "diverged": "diverged",
                "gpu_unhealthy": "gpu_unhealthy"}
_BACKOFF_KINDS = ("hang", "cuda_oom", "compile_error", "workers_died")


def notice_for(item) -> tuple[str, dict] | None:
    """(kind, fields) for one of the policy's decisions (or a finished epoch), or None: nothing to tell."""
    name = type(item).__name__
    if name == "StateChanged":
        f = {"attempt": item.attempt, "cause": item.cause, **item.detail}
        if item.new == "failed":
            kind = _INTO_FAILED.get(item.cause)
        elif item.new == "done":
            # a new run that finds the fold already finished is not news (it was told when it finished)
            kind = None if item.old == "idle" else _INTO_DONE.get(item.cause)
        elif item.new == "backoff":
            # a worker trial's restart is the supervisor's own doing: not news (its result is in status)
            kind = None if item.cause == "tuning" else item.cause if item.cause in _BACKOFF_KINDS else "crash"
        else:
            kind = {"paused": "thermal_pause", "cooling": "thermal_stop", "no_space": "disk_full"}.get(item.new)
        return (kind, f) if kind else None
    if name == "Diagnosed":
        return "bottleneck", dict(item.verdict)
    if name == "Spawn":
        return "started", {"resume_from": item.resume_from}
    if name == "EpochDone":
        return "epoch", {"epoch": item.record.epoch}
    if name == "QNotice":  # the queue's own decisions (core/queue_policy.py): a retired GPU slot, the end
        return item.kind, dict(item.fields)
    return None


def _num(x, nd=4):
    return round(x, nd) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _jsonable(v):
    if isinstance(v, (list, tuple, dict)):
        return {str(k): _jsonable(x) for k, x in v.items()} if isinstance(v, dict) else [_jsonable(x) for x in v]
    return _num(v, 6) if isinstance(v, float) else v if v is None or isinstance(v, (str, int, bool)) else str(v)


def _text(kind: str, f: dict, b: dict) -> str:
    """The message: what the policy decided (its own words for final outcomes), never what it might do."""
    ema = f"{b['ema_dice']:.4f}" if b["ema_dice"] is not None else "n/a"
    restart = f"restart {f.get('restart')} in {f.get('delay_s')} s with --c"
    return {
        "target_reached": f"target reached: EMA pseudo Dice {ema} at epoch {b['epoch']} (target "
                          f"{b['target_ema_dice']}); stopped at a safe point ({f.get('message')})",
        "completed": f"training completed at epoch {b['epoch']} (EMA {ema}, best {b['best_ema_dice']})",
        "gave_up": f"gave up: {f.get('message')}",
        "config_error": f"configuration error, not restarted: {f.get('message')}",
        "diverged": f"stopped, not restarted: {f.get('message')}",
        "preempted": f"SLURM: {f.get('message')}",
        "cuda_oom": f"CUDA out of memory at batch size {f.get('old')}: lowering it to {f.get('new')} in the plans "
                    "file, then resuming with --c",
        "thermal_stop": f"stopped at a safe point for heat ({f.get('cause')}, GPUs {f.get('temps')}); restarts with "
                        f"--c once every GPU is at or below {f.get('resume_below')} C",
        "thermal_pause": f"GPU too hot {f.get('temps')}: training paused above {f.get('above')} C",
        "gpu_unhealthy": f"GPU hardware errors: stopped, not restarted on it: {f.get('message')}",
        "compile_error": f"torch.compile failed in attempt {f.get('attempt')} ({f.get('error')}): {restart} and "
                         "nnUNet_compile=f for the rest of this job (training.compile = \"on\" compiles again)",
        "workers_died": f"attempt {f.get('attempt')} ended: its augmentation workers died (host RAM or /dev/shm); "
                        + restart + (f", nnUNet_n_proc_DA {f['workers'][0]} -> {f['workers'][1]}" if f.get("workers")
                                     else "; fewer workers if it happens again"),
        "hang": f"attempt {f.get('attempt')} made no progress with an idle trainer and was stopped; {restart}",
        "crash": f"attempt {f.get('attempt')} ended ({f.get('cause')}); {restart}"
                 + (f", nnUNet_n_proc_DA {f['workers'][0]} -> {f['workers'][1]}" if f.get("workers") else ""),
        "started": f"training started: attempt {b['attempt']}"
                   + (f", resuming from {f['resume_from']}" if f.get("resume_from") else ""),
        "bottleneck": f"training is slower than it could be: {f.get('why') or f.get('bottleneck')}"
                      + (f"; knob: {f['knob']}" if f.get("knob") else ""),
        "disk_full": f"the disk is full: training waits (up to {f.get('wait_minutes')} min) for room for the next "
                     "checkpoint, then resumes with --c; checkpoints are kept",
        "epoch": f"epoch {b['epoch']}: EMA {ema} (best {b['best_ema_dice']}, target {b['target_ema_dice']}), "
                 f"batch size {b['batch_size']}, {b['restarts']} restarts",
    }.get(kind, kind)


def body(kind: str, fields: dict, snap: dict | None, host: str | None = None, now: float | None = None) -> dict:
    """The webhook's JSON body (Apprise gets its title and message). Tolerates a partial snapshot."""
    snap = snap or {}
    jb, sup, settings = snap.get("job") or {}, snap.get("sup") or {}, snap.get("settings") or {}
    epochs = snap.get("epochs") or []
    last = epochs[-1] if epochs else {}
    emas = [e.get("ema") for e in epochs if _num(e.get("ema")) is not None]
    ema = fields.get("ema", last.get("ema"))
    best = fields.get("best_ema")
    if _num(ema) is not None:
        emas.append(ema)
    b = {
        "event": kind,
        "dataset": jb.get("dataset"), "configuration": jb.get("configuration"), "fold": jb.get("fold"),
        "trainer": jb.get("trainer"),
        "epoch": fields.get("epoch", last.get("epoch")),
        "ema_dice": _num(ema),
        "best_ema_dice": next((_num(v) for v in (best, snap.get("best_ema")) if _num(v) is not None),
                              _num(max(emas)) if emas else None),
        "target_ema_dice": settings.get("ema_dice"),
        "batch_size": fields["new"] if kind == "cuda_oom" and "new" in fields else sup.get("batch_size"),
        "restarts": sup.get("restarts", 0),
        "attempt": sup.get("attempt"),
        "state": sup.get("state"),
        "host": host or socket.gethostname(),
        "time": datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).astimezone()
        .isoformat(timespec="seconds"),
        "details": _jsonable(fields),
    }
    if kind == "cuda_oom":
        b["old_batch_size"], b["new_batch_size"] = fields.get("old"), fields.get("new")
    b["message"] = _text(kind, fields, b)
    where = f"{b['dataset']} {b['configuration']} fold {b['fold']}"
    b["title"] = f"cardiacseg-train {kind}: {where} on {b['host']}"
    return b
