"""The batch-size fit ([tune] batch_size_fit): before the first attempt on a GPU, the largest batch size that
keeps [tune] fit_headroom of its memory free, written to the plans like the OOM step-down's.

How it works (pure, like every rule; the lines of the table are in policy.py):
- `wanted` / `begin` (from the Start rule, where it would start the first attempt): the fit is on, the job
  trains on one CUDA GPU, and no fit was recorded for this GPU (Start.gpu: NVML's UUID; a job moved to
  another GPU fits again; without NVML a recorded fit stands). The job waits in IDLE with Sup.fit =
  {phase: probing} and FitBatchSize goes out; Sup.fit_deadline bounds it ([tune] fit_max_seconds).
- `on_fitted` (IDLE x BatchSizeFitted): batch_fit.choose picks the largest probed size whose peak fits,
  within the plans' dataset cap and not below the floor. Sup.fit records the table, the GPU, the choice
  (phase done, or failed with the error). A different size -> SetBatchSize(fit=True) (phase writing);
  the same size, no choice or a failed probe -> the first attempt starts with the plans' size: a fit
  never blocks the training.
- `on_written` (IDLE x BatchSizeSet): the plans file says the new size -> the first attempt starts.
- `on_tick` (IDLE x Tick): past fit_deadline -> CancelFit(report): the child is ended and what it
  measured by then is judged like any answer (its partial table, or the error that it gave none).
- `cancels_fit(rule)`: a rule that moves the job out of IDLE while the probe runs (a stop, a GPU fault)
  also ends the probe (CancelFit), and the fit is marked cancelled: the next run fits again.
The fit is measured once per GPU: a later OOM steps the fitted size down as always, and the next run on
the same GPU keeps the stepped-down size rather than fitting (and OOMing) again.
"""
from __future__ import annotations

import dataclasses
import functools

from supervisor.core import batch_fit
from supervisor.core.actions import CancelFit, FitBatchSize, Log, SetBatchSize
from supervisor.core.events import BatchSizeFitted, BatchSizeSet, Start
from supervisor.core.record import State, Sup
from supervisor.core.transition import start_attempt, transition

DONE_PHASES = ("done", "failed")  # a fit that reached a verdict on its GPU; any other is made again


def wanted(s: Sup, ev: Start, cfg) -> tuple[bool, str]:
    """(fit now?, why not)."""
    t = cfg.tune
    if not t.batch_size_fit:
        return False, "off"
    if cfg.training.device != "cuda" or cfg.training.num_gpus != 1:
        return False, "it fits one CUDA GPU (training.device = \"cuda\", training.num_gpus = 1)"
    if ev.batch_size is None:
        return False, "the plans' batch size is unknown"
    f = s.fit or {}
    if f.get("phase") not in DONE_PHASES:
        return True, ""
    if ev.gpu is None:
        return False, "fitted before, and without NVML this GPU cannot be told from that one"
    if batch_fit.same_gpu(f.get("uuid"), ev.gpu[0]):
        return False, f"fitted before on this GPU ({f.get('gpu')})"
    return True, ""


def begin(s: Sup, ev: Start, now, cfg, acts: list):
    """Wait in IDLE for the probe (a new run of a job that ended, or was killed, comes from its old state)."""
    gpu = tuple(ev.gpu) if ev.gpu else (None, None, None)
    t = cfg.tune
    detail = {"batch_size": ev.batch_size, "gpu": gpu[1], "max_seconds": t.fit_max_seconds}
    if s.state != State.IDLE:
        s, ch = transition(s, State.IDLE, "batch_size_fit", detail)
        acts = [*acts, ch]
    s = dataclasses.replace(s, fit={"phase": "probing", "from": ev.batch_size, "uuid": gpu[0], "gpu": gpu[1],
                                    "total_bytes": gpu[2], "headroom": t.fit_headroom},
                            fit_deadline=now + t.fit_max_seconds)
    return s, [*acts, Log("batch_size_fit_started", fields={**detail, "headroom": t.fit_headroom,
                                                                    "iterations": t.fit_iterations}),
               FitBatchSize(ev.batch_size, t.fit_headroom, t.fit_iterations, t.fit_max_seconds)]


def floor(cfg) -> int:
    """Never below [oom] min_batch_size: a plans size under it would make the next start refuse the plans."""
    return max(1, cfg.oom.min_batch_size if cfg.oom.enabled else 1)


def on_fitted(s: Sup, ev: BatchSizeFitted, now, cfg):
    """the probe's table -> the largest batch size within the headroom and the plans' cap -> write it, or start"""
    f = s.fit or {}
    if f.get("phase") != "probing":
        return s, []  # a second answer (the child exited as it was cancelled): the first one was judged
    headroom = f.get("headroom", cfg.tune.fit_headroom)
    table = [list(r) for r in ev.table]
    chosen, why = (None, "") if ev.error else batch_fit.choose(table, ev.total_bytes, headroom, ev.upper,
                                                               floor(cfg))
    rec = {**f, "phase": "failed" if ev.error else "done", "table": table, "chosen": chosen, "why": why,
           "upper": ev.upper, "upper_why": ev.upper_why, "stopped": ev.stopped, "error": ev.error,
           "model": ev.model, "seconds": round(sum(r[2] for r in table if len(r) > 2 and r[2]), 1),
           "gpu": ev.gpu or f.get("gpu"), "uuid": ev.uuid or f.get("uuid"),
           "total_bytes": ev.total_bytes or f.get("total_bytes"),
           "limit_bytes": batch_fit.limit_bytes(ev.total_bytes, headroom) if ev.total_bytes else None}
    s = dataclasses.replace(s, fit=rec, fit_deadline=None)
    fields = {"chosen": chosen, "plans": f.get("from"), "upper": ev.upper, "gpu": rec["gpu"],
              "total": batch_fit.gib(rec["total_bytes"]), "headroom": headroom,
              "table": batch_fit.table_text(table), **({"stopped": ev.stopped} if ev.stopped else {})}
    if ev.error:
        log = Log("batch_size_fit_failed", "warning", {**fields, "error": ev.error,
                                                       "then": f"training with the plans' batch size {s.batch_size}"})
    else:
        log = Log("batch_size_fitted", fields={**fields, "why": why})
    if chosen is None or chosen == s.batch_size or s.batch_size is None:
        s, more = start_attempt(s, now, cfg, restart=False)
        return s, [log, *more]
    s = dataclasses.replace(s, fit={**rec, "phase": "writing"})
    return s, [log, SetBatchSize(s.batch_size, chosen, fit=True)]


def on_written(s: Sup, ev: BatchSizeSet, now, cfg):
    """the plans file says the fitted size -> the first attempt"""
    f = s.fit or {}
    if f.get("phase") != "writing":
        return s, []  # not the fit's write (a step-down is asked for only in BACKOFF)
    acts = []
    if ev.new != f.get("chosen"):  # another job of the queue changed the shared plans meanwhile: theirs stands
        acts.append(Log("batch_size_fit_not_written", "warning", {"chosen": f.get("chosen"), "plans": ev.new,
                                                                  "why": "the plans file changed meanwhile"}))
    s = dataclasses.replace(s, fit={**f, "phase": "done"}, batch_size=ev.new, original_batch_size=ev.new)
    s, more = start_attempt(s, now, cfg, restart=False)
    return s, [*acts, *more]


def on_tick(s: Sup, ev, now, cfg):
    """past [tune] fit_max_seconds -> end the probe; what it measured by then is judged"""
    if s.fit_deadline is None or now < s.fit_deadline:
        return s, []
    s = dataclasses.replace(s, fit_deadline=None)
    return s, [Log("batch_size_fit_time_bound", "warning", {"max_seconds": cfg.tune.fit_max_seconds}),
               CancelFit(report=True)]


def cancels_fit(rule):
    """`rule`, and when it moves the job out of IDLE while the probe runs: end the probe too."""
    @functools.wraps(rule)
    def wrapped(s: Sup, ev, now, cfg):
        probing = (s.fit or {}).get("phase") == "probing"
        s2, acts = rule(s, ev, now, cfg)
        if probing and s2.state != State.IDLE:
            s2 = dataclasses.replace(s2, fit={**s.fit, "phase": "cancelled"}, fit_deadline=None)
            acts = [CancelFit(report=False), *acts]
        return s2, acts
    wrapped.__doc__ = rule.__doc__.strip().splitlines()[0] + "; a batch-size fit under way is ended"
    return wrapped
