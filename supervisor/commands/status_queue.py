"""`cardiacseg-train status` for a queue: one row per job, the queue's totals and ETA, and what the queue
decided that a person must know.

How it works: each job's own status is `status.gather` over its single-job config (its state directory
below the queue's); the master's queue.json says, while it runs, each job's queue status, what a pending
job waits for (a free slot, its 3d_lowres folds, the first job's data loading), the GPUs reported
unhealthy and the slots retired for them. A start the master refused is shown from start_refused.json.
"""
from __future__ import annotations

import json
import statistics

from supervisor.commands.status import _dur, _ts, gather
from supervisor.config.loader import Config
from supervisor.integrations.environment import read_refused
from supervisor.integrations.store import Lock


def gather_queue(cfg: Config) -> dict:
    """A queue's status: every job's own status (as for a single job) plus the queue's totals and ETA."""
    from supervisor.core import queue_policy
    from supervisor.daemon import queue_master

    try:
        qdata = json.loads((cfg.paths.state_dir / "queue.json").read_text())
    except (OSError, ValueError):
        qdata = {}
    recorded = {j.get("key"): j for j in qdata.get("jobs", []) if isinstance(j, dict)}
    holder = Lock.holder(cfg.paths.state_dir)
    jobs = []
    for j in queue_policy.jobs(cfg):
        spec = {"configuration": j.configuration, "fold": j.fold, "state_dir": str(queue_master.state_dir(cfg, j)),
                "gpu": (recorded.get(j.key) or {}).get("gpu")}
        i = gather(queue_master.job_config(cfg, spec))
        rec = recorded.get(j.key) or {}
        # queue.json is the master's view while it runs; afterwards each job's own state tells
        state = (rec.get("status") if holder else None) or ("done" if i["outcome"] in queue_policy.DONE_OUTCOMES else i["state"])
        jobs.append({"configuration": j.configuration, "fold": j.fold, "state": i["state"], "queue_status": state,
                     "outcome": i["outcome"], "epoch": i["epoch"], "ema_dice": i["ema_dice"],
                     "best_ema_dice": i["best_ema_dice"], "target_ema_dice": i["target_ema_dice"],
                     "restarts": i["restarts"], "gpu": spec["gpu"], "eta_s": i["eta_target_s"] or i["eta_last_epoch_s"],
                     "batch_size": i["batch_size"], "state_dir": spec["state_dir"],
                     "waits_for": rec.get("waits_for") if holder and state == "pending" else None,
                     "message": i["message"], "start_refused": i.get("start_refused")})
    etas = [x["eta_s"] for x in jobs if x["eta_s"] and x["queue_status"] != "done"]
    slots = max(1, len(cfg.queue.gpus))
    waiting = [x for x in jobs if x["queue_status"] == "pending"]
    median = statistics.median(etas) if etas else None
    queue_eta = (sum(etas) + (median or 0) * len(waiting)) / slots if median is not None else None
    return {"state": "running" if holder else ("done" if all(x["queue_status"] == "done" for x in jobs) else "stopped"),
            "running": bool(holder), "supervisor": holder, "jobs": jobs,
            "done": sum(x["queue_status"] == "done" for x in jobs), "total": len(jobs), "eta_queue_s": queue_eta,
            "find_best_configuration": qdata.get("find_best_configuration"),
            "unhealthy_gpus": qdata.get("unhealthy_gpus") if isinstance(qdata.get("unhealthy_gpus"), dict) else {},
            "retired_slots": qdata.get("retired_slots") if isinstance(qdata.get("retired_slots"), list) else [],
            "start_refused": None if holder else read_refused(cfg.paths.state_dir)}


def render_queue(i: dict) -> str:
    head = f"all {i['total']} jobs done" if i["state"] == "done" else f"{i['state']}, {i['done']}/{i['total']} jobs done"
    lines = [f"queue:        {head}" + (f"  ({i['supervisor']})" if i["running"] else "")]
    if i.get("start_refused"):
        lines.append(f"refused:      {_ts(i['start_refused'].get('at'))} {i['start_refused']['message']}")
    for gpu, who in sorted((i.get("unhealthy_gpus") or {}).items()):
        lines.append(f"GPU {gpu}:        UNHEALTHY (reported by {who}): no job starts on slot(s) "
                     f"{', '.join(str(s) for s in i.get('retired_slots') or []) or '?'}")
    if i["eta_queue_s"]:
        lines.append(f"queue ETA:    {_dur(i['eta_queue_s'])}")
    lines.append(f"{'configuration':<20} {'fold':<5} {'state':<13} {'epoch':>5} {'EMA':>6} {'target':>6} "
                 f"{'restarts':>8} {'GPU':>4}  ETA")
    for x in i["jobs"]:
        ema = f"{x['ema_dice']:.3f}" if x["ema_dice"] is not None else "-"
        tgt = f"{x['target_ema_dice']:g}" if x["target_ema_dice"] else "-"
        lines.append(f"{x['configuration']:<20} {str(x['fold']):<5} {x['queue_status']:<13} "
                     f"{'-' if x['epoch'] is None else x['epoch']:>5} {ema:>6} {tgt:>6} {x['restarts']:>8} "
                     f"{x['gpu'] if x['gpu'] is not None else '-':>4}  {_dur(x['eta_s']) if x['eta_s'] else '-'}")
    for x in i["jobs"]:
        if x.get("waits_for"):
            lines.append(f"  {x['configuration']} fold {x['fold']} {x['waits_for']}")
        elif x.get("start_refused"):
            lines.append(f"  {x['configuration']} fold {x['fold']} refused to start: {x['start_refused']['message']}")
        elif x["queue_status"] == "no_healthy_gpu":
            lines.append(f"  {x['configuration']} fold {x['fold']}: not started: every GPU slot holds an unhealthy GPU")
    fb = i.get("find_best_configuration")
    if fb:
        lines.append(f"find_best_configuration: exit {fb.get('exit_code')}, log {fb.get('log')}")
        lines += [f"  {t}" for t in (fb.get("tail") or [])[-6:]]
    return "\n".join(lines)
