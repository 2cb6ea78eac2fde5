"""The one-line summary of where the job stands: systemd's STATUS= and state.json's `status_line`.

Pure: it reads the decision state (`Sup`), the last epoch and the config. The daemon calls it with a
monotonic `now` (Sup's deadlines are monotonic in the running supervisor).
"""
from __future__ import annotations

import math


def summary_line(sup, last, cfg, now: float) -> str:
    """One line for systemd's STATUS= (`systemctl status`): where the job stands right now."""
    st = sup.state.value
    known = [c for c in (sup.temps or {}).values() if c is not None]
    if st == "backoff" and sup.restart_at is not None:
        budget = (f"; crash budget {len(sup.restart_times) + 1}/{cfg.restart.max_restarts}" if sup.restart_counts
                  else "; not counted")
        return (f"waiting {max(0, sup.restart_at - now):.0f} s before restart {sup.restarts + 1} "
                f"after {sup.last_reason.value if sup.last_reason else 'exit'}{budget}")
    if st == "idle" and (sup.fit or {}).get("phase") in ("probing", "writing"):
        return f"fitting the batch size (the plans say {sup.fit.get('from')}) before attempt {sup.attempt + 1}"
    if st in ("done", "failed"):
        return f"{st}: {sup.outcome}" + (f" ({sup.message})" if sup.message else "")
    if st == "paused":
        return f"paused: GPU {max(known):.0f}C" if known else "paused for heat"
    if st == "cooling":
        return (f"cooling: GPU {max(known):.0f}C, restart at or below {cfg.thermal.resume_celsius:g}C" if known
                else "waiting for temperature readings before restarting")
    if st == "no_space":
        need = f"{sup.disk_needed / 2**30:.1f} GiB" if sup.disk_needed else "room"
        return f"disk full: waiting for {need} free for the next checkpoint"
    parts = [] if st == "running" else [st.replace("_", " ") + ":"]
    if last is not None:
        parts.append(f"epoch {last.epoch}/{cfg.training.expected_epochs}")
        ema = "n/a" if math.isnan(last.ema) else f"{last.ema:.3f}"
        parts.append(f"EMA {ema}" + (f" (target {cfg.target.ema_dice:g})" if cfg.target.ema_dice else ""))
    else:
        parts.append(f"attempt {sup.attempt} starting")
    if sup.batch_size is not None:
        parts.append(f"bs {sup.batch_size}")
    if known:
        parts.append(f"GPU {max(known):.0f}C")
    return " ".join(parts)
