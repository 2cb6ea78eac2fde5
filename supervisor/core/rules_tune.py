"""Worker tuning: when data loading is the limit, try more augmentation workers once, measure, keep or go back.

How it works (pure, like every rule; called from the EpochProfiled, EpochDone and attempt-end rules):
- `maybe_trial`: the epoch's verdict (core/diagnose.py) is data_loading with a suggested nnUNet_n_proc_DA
  above the current count (the suggestion is already capped by the free cores and by the RAM a worker
  takes, see diagnose), [tune] workers is on, no trial was made in this job, and this attempt has
  measure_epochs epochs besides its first (start-up and torch.compile make the first one slow). Then
  Sup.tuning = {phase: trial, from, to, before_s: the median of those epochs} and the trainer is stopped at
  its next safe point (Reason.TUNING).
- `restart`: the attempt that ended for TUNING restarts at once, not counted against the crash budget,
  with the trial's count (SetWorkers records it where `status` shows it), or back with the old one when
  the trial is being reverted.
- `judge`: once the trial's attempt has measure_epochs epochs besides its first, their median is compared
  with before_s: at least min_gain shorter -> kept; else reverted (a second stop at the safe point, and the
  old count). Either way it is final for this job (Sup.tuning is kept across runs of the supervisor): the
  machine was measured once, and a run is never restarted in a loop for speed.
- A trial attempt that ended for another reason with another count (host OOM halves the workers) is
  abandoned: the remedy's count stands.
"""
from __future__ import annotations

import dataclasses

from supervisor.core.actions import Log, SetWorkers
from supervisor.core.classify import Reason
from supervisor.core.record import State, Sup
from supervisor.core.transition import request_stop, transition


def _median(xs) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def _measured(s: Sup, cfg) -> float | None:
    """The median of this attempt's last measure_epochs epochs, its first epoch left out; None: too few."""
    n = cfg.tune.measure_epochs
    if s.epochs_this_attempt < n + 1 or len(s.epoch_times) < n:
        return None
    return round(_median(s.epoch_times[-n:]), 3)


def maybe_trial(s: Sup, verdict, now, cfg):
    """(sup', actions) when a trial starts now, else None."""
    k = verdict.figures.get("suggested_workers") if verdict.kind == "data_loading" else None
    if (not cfg.tune.workers or s.state != State.RUNNING or s.tuning is not None or not isinstance(k, int)
            or not s.n_proc_da or k <= s.n_proc_da or s.validate_only):
        return None
    before = _measured(s, cfg)
    if before is None:
        return None
    s = dataclasses.replace(s, tuning={"phase": "trial", "from": s.n_proc_da, "to": k, "before_s": before,
                                       "after_s": None})
    why = f"data loading is the limit: trying nnUNet_n_proc_DA={k} (now {s.n_proc_da})"
    s, acts = request_stop(s, Reason.TUNING, now, cfg, why, cfg.stop.checkpoint_wait_seconds)
    return s, [Log("workers_trial", "warning", {"from": s.tuning["from"], "to": k, "before_s": before}), *acts]


def restart(s: Sup, now, cfg):
    """The attempt stopped for tuning: restart at once with the trial's count, or back with the old one."""
    t = dict(s.tuning or {})
    old = s.n_proc_da or t.get("from") or 1
    new = t["to"] if t.get("phase") == "trial" else t.get("from") or old
    if t.get("phase") == "reverting":
        t["phase"] = "reverted"
    s, ch = transition(s, State.BACKOFF, Reason.TUNING, {"delay_s": 0, "counted": False, "workers": [old, new],
                                                         "restart": s.restarts + 1},
                       n_proc_da=new, tuning=t, restart_counts=False, restart_at=now)
    return s, [ch, *([SetWorkers(old, new)] if new != old else [])]


def judge(s: Sup, now, cfg):
    """(sup', actions) when the trial is decided on this epoch, else None."""
    t = s.tuning
    if not t or t.get("phase") != "trial":
        return None
    if s.n_proc_da != t.get("to"):
        s = dataclasses.replace(s, tuning={**t, "phase": "abandoned"})
        return s, [Log("workers_trial_abandoned", "warning", {"workers": s.n_proc_da})]
    after = _measured(s, cfg)
    if after is None:
        return None
    kept = after <= t["before_s"] * (1 - cfg.tune.min_gain)
    t = {**t, "after_s": after, "phase": "kept" if kept else "reverting"}
    fields = {"from": t["from"], "to": t["to"], "before_s": t["before_s"], "after_s": after,
              "kept": kept, "min_gain": cfg.tune.min_gain}
    s = dataclasses.replace(s, tuning=t)
    if kept:
        return s, [Log("workers_tuned", fields=fields)]
    s, acts = request_stop(s, Reason.TUNING, now, cfg, f"nnUNet_n_proc_DA={t['to']} was not faster "
                           f"({t['before_s']} s -> {after} s a median epoch): going back to {t['from']}",
                           cfg.stop.checkpoint_wait_seconds)
    return s, [Log("workers_tuned", "warning", fields), *acts]
