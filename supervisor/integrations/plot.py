"""The progress picture: EMA and per-class pseudo Dice against epochs, with what happened marked on it.

How it works
- `markers(snap)` derives one vertical marker per event from the state snapshot: each restart (attempt
  k+1 starts at its `epoch_start`, labelled with the reason attempt k ended; a CUDA OOM restart is one
  `oom` marker labelled with the batch-size change from `changes`; a thermal stop one `thermal_stop`
  marker), each thermal pause recorded in `snap["marks"]` (the glue records them, state.json does not),
  and the final stop (the outcome, or a stop request).
- `render(snap, out_path)` draws two panels with matplotlib's object API and the Agg canvas (no pyplot,
  so it is safe in a background thread and needs no display): Dice on top (EMA thick, one thin line per
  class named as dataset.json names it, the target dashed; the y axis starts just below 0, so a class
  stuck at 0.0 shows), epoch time below; the markers on both, a label in the plot's right third to the
  left of its line. matplotlib is imported only here,
  lazily: the daemon imports it only when the first picture is drawn, in a worker thread (sinks.py).
  The PNG is written to a temp file and renamed, so a reader never sees half a picture.
- `main(cfg, out)` is `cardiacseg-train plot`: state.json (plus the recorded marks), or, without state,
  the fold's training logs; default output `default_path(cfg)` = `<state_dir>/progress.png`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

MARKS_FILE = "plot-marks.json"
COLOURS = {"restart": "tab:red", "oom": "tab:purple", "thermal_pause": "tab:brown",
           "thermal_stop": "tab:brown", "stop": "black"}


def default_path(cfg) -> Path:
    return Path(cfg.paths.state_dir) / "progress.png"


def _f(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def markers(snap: dict) -> list[dict]:
    """[{kind, epoch, label}] in epoch order: kind restart | oom | thermal_stop | thermal_pause | stop."""
    epochs, attempts = snap.get("epochs") or [], snap.get("attempts") or []
    changes, sup = snap.get("changes") or [], snap.get("sup") or {}
    last_epoch = epochs[-1]["epoch"] if epochs else 0
    out = []
    for k in range(1, len(attempts)):
        prev, a = attempts[k - 1], attempts[k]
        x = a.get("epoch_start")
        if x is None:
            x = (prev.get("epoch_reached") or last_epoch) + 1
        reason = prev.get("reason") or "restart"
        oom = [c for c in changes if c.get("what") == "batch_size" and c.get("attempt") == prev.get("n")]
        if oom:
            out.append({"kind": "oom", "epoch": x, "label": f"OOM: bs {oom[-1]['old']}\u2192{oom[-1]['new']}"})
        elif reason in ("thermal_stop", "sensor_lost"):
            out.append({"kind": "thermal_stop", "epoch": x, "label": reason.replace("_", " ")})
        else:
            out.append({"kind": "restart", "epoch": x, "label": f"restart: {reason}"})
    for m in snap.get("marks") or []:
        if m.get("kind") == "thermal_pause" and m.get("epoch") is not None:
            out.append({"kind": "thermal_pause", "epoch": m["epoch"], "label": "thermal pause"})
    outcome = sup.get("outcome")
    stop = next((m for m in reversed(snap.get("marks") or []) if m.get("kind") == "stop"), None)
    if outcome or stop:
        out.append({"kind": "stop", "epoch": last_epoch if outcome or stop.get("epoch") is None else stop["epoch"],
                    "label": f"stop: {outcome or stop.get('label') or 'requested'}"})
    return sorted(out, key=lambda m: m["epoch"])


def figure(snap: dict, width_in: float = 11.0):
    """(matplotlib Figure on an Agg canvas, markers drawn). Marker lines carry gid `marker-<kind>`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [e for e in snap.get("epochs") or [] if isinstance(e.get("epoch"), int)]
    xs = [e["epoch"] for e in epochs]
    jb, sup, settings = snap.get("job") or {}, snap.get("sup") or {}, snap.get("settings") or {}
    fig = Figure(figsize=(width_in, 7.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    n_cls = max((len(e.get("dice") or []) for e in epochs), default=0)
    names = [str(n) for n in snap.get("class_names") or []]
    for c in range(n_cls):
        ys = [_f((e.get("dice") or [None] * n_cls)[c]) if c < len(e.get("dice") or []) else None for e in epochs]
        top.plot(xs, [math.nan if y is None else y for y in ys], lw=0.9, alpha=0.7,
                 label=names[c] if c < len(names) else f"class {c + 1}")
    top.plot(xs, [_f(e.get("ema")) if _f(e.get("ema")) is not None else math.nan for e in epochs],
             lw=2.4, color="black", label="EMA pseudo Dice")
    target = _f(settings.get("ema_dice"))
    if target is not None:
        top.axhline(target, ls="--", lw=1.2, color="tab:green", label=f"target {target:g}")
    top.set_ylim(-0.04, 1.02)  # a class stuck at 0.0 is a line above the x axis, not hidden on it
    top.set_ylabel("pseudo Dice")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)  # beside the plot: it covers no line
    bottom.plot(xs, [_f(e.get("epoch_time")) or math.nan for e in epochs], ".-", lw=1, color="tab:blue")
    bottom.set_ylabel("epoch time (s)")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    ms = markers(snap)
    lo, hi = min(xs + [m["epoch"] for m in ms], default=0), max(xs + [m["epoch"] for m in ms], default=1)
    for i, m in enumerate(ms):
        colour = COLOURS.get(m["kind"], "grey")
        style = ":" if m["kind"] == "thermal_pause" else "-"
        top.axvline(m["epoch"], color=colour, ls=style, lw=1.2, alpha=0.8, gid=f"marker-{m['kind']}")
        bottom.axvline(m["epoch"], color=colour, ls=style, lw=1.0, alpha=0.6)
        # alternate heights so neighbouring labels do not overlap; in the right third of the plot a label
        # goes to the left of its line, so it never runs past the plot's right edge
        right = hi > lo and (m["epoch"] - lo) / (hi - lo) > 2 / 3
        top.text(m["epoch"], 0.98 - 0.09 * (i % 4), m["label"] + " " if right else " " + m["label"], rotation=0,
                 fontsize=8, color=colour, va="top", ha="right" if right else "left",
                 transform=top.get_xaxis_transform(), gid=f"label-{m['kind']}",
                 bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "alpha": 0.8, "linewidth": 0})
    title = f"{jb.get('dataset', '?')} {jb.get('configuration', '')} fold {jb.get('fold', '?')}"
    state = sup.get("outcome") or sup.get("state")
    if epochs:
        ema = _f(epochs[-1].get("ema"))
        title += f"  epoch {xs[-1]}" + (f"  EMA {ema:.3f}" if ema is not None else "")
    top.set_title(title + (f"  [{state}]" if state else ""), fontsize=10)
    return fig, ms


def render(snap: dict, out_path) -> list[dict]:
    """Draw the picture into out_path (PNG, written atomically); return the markers drawn."""
    fig, ms = figure(snap)
    out_path = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ms


def load_marks(state_dir) -> list[dict]:
    try:
        marks = json.loads((Path(state_dir) / MARKS_FILE).read_text())
        return marks if isinstance(marks, list) else []
    except (OSError, ValueError):
        return []


def main(cfg, out_path=None) -> int:
    """`cardiacseg-train plot`: 0 when drawn, 1 when there is nothing to draw or it cannot be written."""
    from supervisor.config import job
    from supervisor.integrations.store import StateStore
    out = Path(out_path) if out_path else default_path(cfg)
    try:
        snap = StateStore(cfg.paths.state_dir).read() or {}
    except (ValueError, UnicodeDecodeError):
        snap = {}
    except OSError as e:  # not this user's to read: say so, then try the fold's logs
        print(f"cannot read {e.filename or cfg.paths.state_dir}: {e.strerror or e}", file=sys.stderr)
        snap = {}
    if snap.get("job") not in (None, job.job_identity(cfg)):
        snap = {}
    if not snap.get("epochs"):
        from supervisor.core.training_log import replay
        from supervisor.integrations.log_follower import LogFollower
        try:
            hist = replay(LogFollower(job.fold_dir(cfg)).drain())
        except OSError as e:
            print(f"cannot read {e.filename or job.fold_dir(cfg)}: {e.strerror or e}", file=sys.stderr)
            return 1
        snap = {"job": job.job_identity(cfg), "epochs": [r.to_json() for r in hist.ordered()]}
    if not snap.get("epochs"):
        print("nothing to plot yet: no epoch in state.json or the fold's training logs", file=sys.stderr)
        return 1
    snap.setdefault("settings", {"ema_dice": cfg.target.ema_dice})
    snap["marks"] = load_marks(cfg.paths.state_dir)
    snap["class_names"] = job.class_names(cfg)
    try:
        render(snap, out)
    except OSError as e:
        print(f"cannot write {out}: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


def example_snapshot(seed: int = 7) -> dict:
    """A realistic synthetic history (README picture, tests): 4 attempts over 80 epochs, a crash, a CUDA OOM
    (bs 6 -> 5), a thermal pause, a thermal stop, and the stop at the target."""
    import random
    rnd = random.Random(seed)
    ema, epochs = 0.0, []
    for ep in range(80):
        base = 0.80 * (1 - math.exp(-ep / 18))
        dice = [min(0.97, max(0.0, base + off + rnd.gauss(0, 0.03))) for off in (0.12, 0.06, -0.14)]
        ema = 0.9 * ema + 0.1 * (sum(dice) / 3) if ep else sum(dice) / 3
        epochs.append({"epoch": ep, "dice": [round(d, 4) for d in dice], "ema": round(ema, 4),
                       "mean_fg_dice": round(sum(dice) / 3, 4), "train_loss": -base, "val_loss": -base + 0.05,
                       "epoch_time": round((140 if ep < 31 else 118) + rnd.gauss(0, 3) + (25 if 47 <= ep < 50 else 0), 1),
                       "new_best": False})
    t0 = 1_780_000_000.0
    attempts = [{"n": 1, "started_at": t0, "epoch_start": 0, "epoch_reached": 17, "reason": "crash", "exit_code": 1},
                {"n": 2, "started_at": t0 + 9e3, "epoch_start": 18, "epoch_reached": 30, "reason": "cuda_oom",
                 "exit_code": 1},
                {"n": 3, "started_at": t0 + 2e4, "epoch_start": 31, "epoch_reached": 52, "reason": "thermal_stop",
                 "exit_code": 130},
                {"n": 4, "started_at": t0 + 3e4, "epoch_start": 53, "epoch_reached": 79, "reason": "target_reached",
                 "exit_code": 130}]
    return {"job": {"dataset": "Dataset001_CardiacSeg", "configuration": "3d_fullres", "fold": 0,
                    "trainer": "nnUNetTrainer", "plans": "nnUNetPlans"},
            "sup": {"state": "done", "attempt": 4, "outcome": "target_reached", "batch_size": 5,
                    "original_batch_size": 6, "exit_code": 0, "restarts": 3,
                    "restart_reasons": {"crash": 1, "cuda_oom": 1, "thermal_stop": 1}},
            "settings": {"ema_dice": round(epochs[-1]["ema"] - 0.002, 3), "expected_epochs": 1000},
            "attempts": attempts, "epochs": epochs,
            "changes": [{"at": t0 + 8.9e3, "attempt": 2, "what": "batch_size", "old": 6, "new": 5,
                         "reason": "cuda_oom"}],
            "marks": [{"kind": "thermal_pause", "epoch": 44, "at": t0 + 2.5e4}],
            "updated_at": t0 + 4e4}


if __name__ == "__main__":  # --example OUT.png (the README's picture) | --snapshot SNAP.json OUT.png (the daemon)
    if len(sys.argv) == 3 and sys.argv[1] == "--example":
        print(render(example_snapshot(), sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--snapshot":
        with open(sys.argv[2]) as fh:
            snap = json.load(fh)
        if snap.get("epochs_dir"):  # the daemon hands over the last few epochs only: the file has them all
            from supervisor.integrations import epoch_log
            snap["epochs"] = epoch_log.read(Path(snap["epochs_dir"])) or snap.get("epochs") or []
        render(snap, sys.argv[3])
    else:
        sys.exit("usage: python -m supervisor.plot --example OUT.png | --snapshot SNAP.json OUT.png")
