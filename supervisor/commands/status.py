"""`cardiacseg-train status`: where training stands, whether or not the daemon runs.

How it works: read state.json (never modify it) and the lock (held = a daemon is running). When there is
no state yet, the epoch history comes straight from the fold's training logs, so status also describes
a run that was never supervised. ETAs: to the target from a least-squares line through the EMA of the
last 10 epochs (none when the EMA is not rising); to the last epoch from the median epoch time. No ETA
for a finished run, nor to a target that a class blocks: under target.min_class_dice, a class below the
minimum whose Dice has not risen over the trend window (e.g. stuck at 0.0) is named instead.
Restarts are the policy's one count (Sup.restarts, by reason in Sup.restart_reasons): the attempts it started
because the previous one ended (a crash, an OOM, a hang, a thermal stop, a full disk, ...); a new `run`
after a stop or a lost supervisor is not one. The status line, the metrics and the notifications read
the same count.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time

from supervisor.core import batch_fit, criteria, diagnose
from supervisor.core.exit_codes import process_exit
from supervisor.config import job
from supervisor.integrations import environment, other_trainers, slurm
from supervisor.config.loader import Config
from supervisor.core.training_log import EpochRecord, History, replay
from supervisor.integrations.log_follower import LogFollower
from supervisor.integrations.plans import plan_batch_size
from supervisor.integrations.store import Lock, StateStore

TREND_EPOCHS = 10
# Reasons after which the supervisor itself starts the next attempt (thermal ones once cool).


def eta_to_target(recs: list[EpochRecord], target: float | None, epoch_s: float | None) -> float | None:
    pts = [(r.epoch, r.ema) for r in recs[-TREND_EPOCHS:] if not math.isnan(r.ema)]
    if target is None or epoch_s is None or len(pts) < 3:
        return None
    if pts[-1][1] >= target:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    if slope <= 0:
        return None
    return math.ceil((target - pts[-1][1]) / slope) * epoch_s


def target_blocker(recs: list[EpochRecord], min_class_dice: float | None) -> str | None:
    """The class that keeps the target out of reach on the current trend, or None.

    A class blocks when its last Dice is below min_class_dice and it has not risen over the last
    TREND_EPOCHS epochs (at least 3 of them): the EMA can reach the target, the class rule cannot."""
    if min_class_dice is None or len(recs) < 3:
        return None
    window = recs[-TREND_EPOCHS:]
    n = min(len(r.dice) for r in window)
    for i in range(n):
        vals = [r.dice[i] for r in window]
        if any(math.isnan(v) for v in vals):
            continue
        if vals[-1] < min_class_dice and max(vals) <= vals[0]:
            return (f"class {i + 1} at {vals[-1]:.4f} for {len(vals)} epochs, below target.min_class_dice "
                    f"{min_class_dice:g}: no ETA")
    return None


def restart_count(sup: dict) -> tuple[int, dict]:
    """(restarts the policy made, reason -> how many) from state.json's sup (0 before any decision)."""
    reasons = sup.get("restart_reasons") if isinstance(sup.get("restart_reasons"), dict) else {}
    n = sup.get("restarts")
    return (n if isinstance(n, int) else 0), dict(reasons)


def _compile(setting: str, turned_off: bool, environment: str | None = None) -> str:
    """torch.compile as the next attempt gets it: the config's setting, [environment], the policy's remedy."""
    if setting == "auto" and turned_off:
        return 'off: turned off after a torch.compile failure (training.compile = "on" compiles again)'
    if setting == "auto" and environment is not None:
        return f"nnUNet_compile={environment} ([environment])"
    return {"auto": "nnU-Net's default (on for CUDA since 2.4)", "on": "on (training.compile)",
            "off": "off (training.compile)"}[setting]


def _tuning(t: dict | None) -> str:
    """The worker trial ([tune] workers), on the DA workers line."""
    if not t:
        return ""
    def s(x):
        return "?" if not isinstance(x, (int, float)) else f"{x:.0f} s"
    return (f"  (tried {t.get('from')} -> {t.get('to')}: median epoch {s(t.get('before_s'))} -> "
            f"{s(t.get('after_s'))}, {t.get('phase')})")


def _thermal(cfg: Config) -> dict | None:
    if not cfg.thermal.enabled:
        return None
    try:
        th = json.loads((cfg.paths.state_dir / "thermal.json").read_text())
    except (OSError, ValueError):
        th = {"readings": [], "error": "no reading yet"}
    th["limits"] = {"pause": cfg.thermal.pause_celsius, "resume": cfg.thermal.resume_celsius, "stop": cfg.thermal.stop_celsius}
    return th


def _clean(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _bottleneck(data: dict, attempts: list[dict], cfg: Config) -> dict | None:
    """The latest verdict: the daemon's (state.json, with the machine's figures) when it recorded one,
    else judged here from the last line of the latest attempt's profile file (the trainer's own timings)."""
    stored = data.get("bottleneck") or data.get("sup", {}).get("bottleneck")
    if isinstance(stored, dict) and stored.get("kind"):
        return stored
    from supervisor.integrations.profiling import ProfileFollower, make_profile

    n = attempts[-1].get("n") if attempts else None
    path = job.attempt_log(cfg, n if isinstance(n, int) else 1).with_suffix(".profile.jsonl")
    lines = ProfileFollower(path).poll() if path.is_file() else []
    if not lines:
        return None
    v = diagnose.verdict(make_profile(lines[-1], None, cfg), cfg)
    return {**v.to_json(), "source": "trainer timings only (no machine samples)"}


def _unreadable(path, e: OSError) -> str:
    return (f"cannot read {getattr(e, 'filename', None) or path}: {e.strerror or e} (run status as the user the "
            "supervisor runs as, e.g. with sudo -u)")


def _try(fn, default=None):
    """A part of the status that may be unreadable for this user: left out (the message says why)."""
    try:
        return fn()
    except OSError:
        return default


def _exists(path) -> bool:
    try:
        return path.exists()
    except OSError:
        return True  # there, but not ours to look into: reading it says why


def gather(cfg: Config) -> dict:
    if not _exists(cfg.paths.state_dir / "state.json"):
        # on a SLURM login node: the job wrote its state below, in state/slurm-<job>[_<task>]
        found, _data = slurm.find_state(cfg)
        if found is not None:
            cfg = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, state_dir=found))
    store = StateStore(cfg.paths.state_dir)
    problem = None
    try:
        data = store.read() or {}
    except (ValueError, UnicodeDecodeError) as e:
        data, problem = {}, f"state.json unreadable: {e}"
    except OSError as e:  # a user who may not read the service's state directory
        data, problem = {}, _unreadable(store.path, e)
    if data and data.get("job") != job.job_identity(cfg):
        data, problem = {}, "state.json belongs to another job"
    try:
        history = (History([EpochRecord.from_json(r) for r in data["epochs"]]) if data.get("epochs")
                   else replay(LogFollower(job.fold_dir(cfg)).drain()))
    except OSError as e:
        history, problem = History(), problem or _unreadable(job.fold_dir(cfg), e)
    recs = history.ordered()
    last = recs[-1] if recs else None
    times = [r.epoch_time for r in recs[-TREND_EPOCHS:] if r.epoch_time]
    epoch_s = statistics.median(times) if times else None
    sup = data.get("sup", {})
    attempts = data.get("attempts", [])
    holder = Lock.holder(cfg.paths.state_dir)
    state = sup.get("state", "unknown" if problem and problem.startswith("cannot read") else "not started")
    if not holder and state not in ("done", "failed", "not started", "unknown"):
        state = f"not running (last: {state})"
    remaining = (cfg.training.expected_epochs - last.epoch - 1) if last else cfg.training.expected_epochs
    bs = _try(lambda: plan_batch_size(job.plans_file(cfg), cfg.training.configuration))
    n_restarts, restart_reasons = restart_count(sup)
    finished = sup.get("state") in ("done", "failed") or _try((job.fold_dir(cfg) / "checkpoint_final.pth").is_file,
                                                               False)
    reached = not finished and criteria.target_met(last, cfg)  # the policy's own rule: `run` stops there
    if reached and not sup and _try((job.fold_dir(cfg) / "checkpoint_best.pth").is_file, False):  # e.g. unpacked
        problem = problem or (f"the target is already met at epoch {last.epoch} (EMA {last.ema:.4f}): `run` will "
                              "end at once (target_reached)")
    blocker = None if finished or reached else target_blocker(recs, cfg.target.min_class_dice)
    eta_target = None if finished or blocker or reached else eta_to_target(recs, cfg.target.ema_dice, epoch_s)
    eta_end = None if finished or reached or epoch_s is None or remaining < 0 else remaining * epoch_s
    plot_path = cfg.paths.state_dir / "progress.png"
    bn = _try(lambda: _bottleneck(data, attempts, cfg))
    return {
        "state": state,
        "running": bool(holder),
        "supervisor": holder,
        "outcome": sup.get("outcome"),
        "message": sup.get("message") or problem,
        "epoch": last.epoch if last else None,
        "ema_dice": _clean(last.ema) if last else None,
        "best_ema_dice": _clean(history.best_ema()),
        "dice_per_class": [_clean(d) for d in last.dice] if last else [],
        "target_ema_dice": cfg.target.ema_dice,
        "min_class_dice": cfg.target.min_class_dice,
        "last_epoch_time_s": last.epoch_time if last else None,
        "median_epoch_time_s": epoch_s,
        "expected_epochs": cfg.training.expected_epochs,
        "eta_target_s": eta_target,
        "eta_last_epoch_s": eta_end,
        "target_blocked_by": blocker,
        "target_reached_at": last.epoch if reached else None,
        "finished": finished,
        "batch_size": bs,
        "original_batch_size": sup.get("original_batch_size") or bs,
        "min_batch_size": cfg.oom.min_batch_size,
        "n_proc_da": sup.get("n_proc_da"),
        "batch_fit": sup.get("fit") if isinstance(sup.get("fit"), dict) else None,
        "compile": _compile(cfg.training.compile, sup.get("compile_off") is True,
                            cfg.environment.get("nnUNet_compile")),
        "tuning": sup.get("tuning") if isinstance(sup.get("tuning"), dict) else None,
        "gpu_faults": sup.get("gpu_faults") if isinstance(sup.get("gpu_faults"), dict) else {},
        "changes": data.get("changes", []),
        "restart_at": sup.get("restart_at"),
        "restarts": n_restarts,
        "restart_reasons": restart_reasons,
        "history": [{k: a.get(k) for k in ("n", "reason", "exit_code", "started_at", "ended_at",
                                              "epoch_start", "epoch_reached", "resume_from", "log")}
                    for a in attempts],
        "paused_for_heat": sup.get("state") == "paused",
        "paused_total_s": sup.get("paused_total", 0.0),
        "thermal": _try(lambda: _thermal(cfg)),
        "fold_dir": str(job.fold_dir(cfg)),
        "state_dir": str(cfg.paths.state_dir),
        "plot": str(plot_path) if _try(plot_path.is_file, False) else None,
        "other_trainers": [{"pid": o.pid, "command": o.command, "supervisor": o.supervisor or None}
                           for o in _try(lambda: other_trainers.find(cfg), [])],
        "bottleneck": bn["kind"] if bn else None,
        "data_wait_fraction": (bn.get("figures") or {}).get("data_wait_fraction") if bn else None,
        "bottleneck_detail": bn,
        "slurm": _slurm(data.get("slurm")),
        "start_refused": None if holder else environment.read_refused(cfg.paths.state_dir),
    }


def _slurm(info) -> dict | None:
    """state.json's "slurm" object (written inside a SLURM job): job id, array task, node, requeues."""
    if not isinstance(info, dict):
        return None
    return {"job_id": info.get("job_id"), "array_job_id": info.get("array_job_id"),
            "array_task": info.get("array_task"), "node": info.get("node"),
            "requeues": info.get("restart_count"), "spec": info.get("spec")}


def _slurm_line(s: dict) -> str:
    task = f" (array {s['array_job_id']}, task {s['array_task']})" if s.get("array_task") is not None else ""
    n = s.get("requeues")
    return (f"slurm:        job {_d(s.get('spec') or s.get('job_id'))}{task} on node {_d(s.get('node'))}, "
            f"requeued {_d(n)} time{'' if n == 1 else 's'} (SLURM_RESTART_COUNT)")


def _dur(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if h or d else "") + f"{m}m {s:02d}s"


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _f4(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _d(x, unit: str = "") -> str:
    """A value for people: '-' for unknown, never 'None'."""
    return "-" if x is None else f"{x:g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def _eta_target(i: dict) -> str:
    if not i["target_ema_dice"]:
        return "no target set"
    if i.get("finished"):
        return "-  (finished)"
    if i.get("target_reached_at") is not None:
        return f"reached at epoch {i['target_reached_at']}"
    return i.get("target_blocked_by") or _dur(i["eta_target_s"])


def _epochs(a: dict) -> str:
    if a.get("epoch_start") is None and a.get("epoch_reached") is None:
        return ""
    start, reached = a.get("epoch_start"), a.get("epoch_reached")
    if reached is None or (isinstance(start, int) and isinstance(reached, int) and reached < start):
        # none of its own: what the history held before it started is not this attempt's
        return f"from epoch {_d(start)}" + (", none finished  " if a.get("ended_at") else "  ")
    return f"epochs {_d(a.get('epoch_start'))}..{a['epoch_reached']}  "


def _bottleneck_lines(b: dict | None) -> list[str]:
    if not b:
        return []
    f = b.get("figures") or {}
    out = [f"bottleneck:   {b.get('kind')} (epoch {_d(f.get('epoch'))}): {b.get('text') or ''}"]
    if b.get("knob"):
        gain = b.get("gain_estimate")
        out.append(f"  knob:       {b['knob']}" + (f"  (about {100 * gain:.0f} % of the epoch time saved)"
                                                     if isinstance(gain, (int, float)) and gain > 0 else ""))
    if b.get("source"):
        out.append(f"  from:       {b['source']}")
    return out


def render(i: dict) -> str:
    lines = [f"state:        {i['state']}" + (f"  ({i['supervisor']})" if i["running"] else "")]
    if i["outcome"]:
        lines.append(f"outcome:      {i['outcome']}")
    if i["message"]:
        lines.append(f"message:      {i['message']}")
    if i.get("start_refused"):  # the last `run` stopped at its start-up checks: what to fix
        lines.append(f"refused:      {_ts(i['start_refused'].get('at'))} {i['start_refused']['message']}")
    for o in i.get("other_trainers") or []:
        lines.append(f"WARNING:      another trainer trains this fold: pid {o['pid']}: {o['command']}"
                     + (f" (supervised by {o['supervisor']})" if o.get("supervisor") else ""))
    if i.get("slurm"):
        lines.append(_slurm_line(i["slurm"]))
    if i.get("plot"):
        lines.append(f"picture:      {i['plot']}")
    if i["restart_at"] and i["state"] == "backoff":
        lines.append(f"restart in:   {_dur(max(0, i['restart_at'] - time.time()))}")
    target = "" if i["target_ema_dice"] is None else f"  (target {i['target_ema_dice']})"
    lines += [
        f"epoch:        {'-' if i['epoch'] is None else i['epoch']} of {i['expected_epochs']}",
        f"EMA Dice:     {_f4(i['ema_dice'])}{target}   best {_f4(i['best_ema_dice'])}",
        "class Dice:   " + (" / ".join(_f4(d) for d in i["dice_per_class"]) or "-"),
        f"epoch time:   last {_d(i['last_epoch_time_s'], ' s')}, median {_d(i['median_epoch_time_s'], ' s')}",
        f"ETA target:   {_eta_target(i)}",
        "ETA end:      " + ("-  (finished)" if i.get("finished") else "-  (stops at the target)"
                            if i.get("target_reached_at") is not None else _dur(i["eta_last_epoch_s"])),
        f"batch size:   {i['batch_size'] if i['batch_size'] is not None else 'unknown'}"
        f"  (original {_d(i['original_batch_size'])}, minimum {i['min_batch_size']})",
        *([f"batch fit:    {fit}"] if (fit := batch_fit.describe(i.get("batch_fit"))) else []),
        f"DA workers:   {i['n_proc_da'] or 'default'}" + _tuning(i.get("tuning")),
        f"compile:      {i['compile']}",
        *(f"GPU {g}:        UNHEALTHY: {what}" for g, what in sorted(i["gpu_faults"].items())),
        *_bottleneck_lines(i.get("bottleneck_detail")),
        f"restarts:     {i['restarts']}" + (f"  ({', '.join(f'{r} {n}' for r, n in i['restart_reasons'].items())})"
                                           if i["restart_reasons"] else ""),
    ]
    th = i.get("thermal")
    if th is not None:
        lim = th.get("limits") or {}
        lines.append(f"thermal:      pause > {lim.get('pause', '?')} C, resume <= {lim.get('resume', '?')} C, "
                     f"stop >= {lim.get('stop', '?')} C; paused {'now, ' if i['paused_for_heat'] else ''}"
                     f"{_dur(i['paused_total_s'])} in total" + (f"; {th['error']}" if th.get("error") else ""))
        for r in th.get("readings", []):
            def v(x, unit="", fmt="{:.0f}"):
                return "?" if x is None else fmt.format(x) + unit
            lines.append(f"  GPU {r['gpu']}: {v(r.get('celsius'), ' C')} (slowdown {v(r.get('slowdown_celsius'), ' C')},"
                         f" shutdown {v(r.get('shutdown_celsius'), ' C')})  {v(r.get('power_w'), ' W')}  "
                         f"util {v(r.get('util_percent'), '%')}  mem {v(r.get('mem_used_mib'), ' MiB')}"
                         + (f"  throttle: {', '.join(r['throttle'])}" if r.get("throttle") else "")
                         + ("  LOST" if r.get("lost") else ""))
    for ch in i["changes"][-5:]:
        lines.append(f"changed:      {_ts(ch['at'])} {ch['what']} {ch['old']} -> {ch['new']} "
                     f"after {ch['reason']}")
    if i["history"]:
        lines.append("attempts:")
        for a in i["history"][-10:]:
            lines.append(f"  #{_d(a['n'])}: {_ts(a['started_at'])} -> {_ts(a['ended_at'])}  {_epochs(a)}"
                         f"{a['reason'] or 'running'}" + ("" if a["exit_code"] is None else f"  {process_exit(a['exit_code'])}"))
    lines.append(f"fold folder:  {i['fold_dir']}")
    return "\n".join(lines)
