"""The glue between the daemon and its optional outputs: notifications, metrics, the progress picture.

How it works
- The daemon calls `Sinks.open(cfg, log)` once at start-up, `publish(item)` for each decision of the
  policy worth telling (a StateChanged, a Diagnosed verdict, a started attempt) and each finished epoch,
  `snapshot(snap)` after every state save, and `close()` before it exits. None of these
  raise (an optional integration must never stop training) and none block: the loop thread only copies
  references, maps events and hands work to threads.
- Notifications: notify.Notifier (its own bounded queue and delivery thread).
- Metrics: the snapshot is swapped into metrics.Metrics at once (the /metrics endpoint serves it from its
  own thread); the textfile is written by a `Latest` worker.
- The picture: a second `Latest` worker redraws `<state_dir>/progress.png` when the number of epochs or
  the final outcome changed. `Latest` keeps only the newest item: a burst of saves while it draws is one
  more drawing, never a queue, and at most one drawing runs at a time.
- Thermal pauses and requested stops are not in state.json; `publish` records them (from StateChanged into
  PAUSED, or into a stop for an operator's or SLURM's request) as marks for the picture, kept in
  `<state_dir>/plot-marks.json` (written by the plot worker) across supervisor restarts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from typing import TYPE_CHECKING

from supervisor.config import job
from supervisor.integrations import notify, proc
from supervisor.integrations import plot

if TYPE_CHECKING:
    from supervisor.integrations.metrics import Metrics

MAX_MARKS = 500


PLOT_MIN_INTERVAL_S = 60.0  # the picture is for people: once a minute at most (and at the end)
PLOT_TIMEOUT_S = 120


class Latest:
    """One daemon thread running fn(item) on the newest submitted item; submit() never blocks."""

    def __init__(self, name: str, fn, log):
        self.name, self.fn, self.log = name, fn, log
        self._cv = threading.Condition()
        self._item, self._pending, self._busy, self._closed = None, False, False, False
        self.runs = self.errors = 0
        self._failing = False
        self.thread = threading.Thread(target=self._run, name=f"cardiacseg-{name}", daemon=True)
        self.thread.start()

    def submit(self, item) -> None:
        with self._cv:  # held by the worker only to swap the item, never while fn runs
            self._item, self._pending = item, True
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending or running (tests, and close)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float) -> None:
        """Finish the pending item if it fits in `timeout`, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self.thread.join(max(0.0, timeout))

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                item, self._pending, self._busy = self._item, False, True
            try:
                self.fn(item)
            except Exception as e:  # an output that fails is logged once per failing stretch, never raised
                self.errors += 1
                if not self._failing:
                    self._failing = True
                    self.log.warning(f"{self.name}_failed", error=f"{type(e).__name__}: {e}")
            else:
                if self._failing:
                    self._failing = False
                    self.log.info(f"{self.name}_recovered")
            with self._cv:
                self._busy = False
                self.runs += 1
                self._cv.notify_all()


def _freeze(snap: dict) -> dict:
    """A copy the worker threads may read while the daemon mutates its own lists (attempt records)."""
    out = dict(snap)
    for k in ("job", "sup", "settings", "temps"):
        if isinstance(out.get(k), dict):
            out[k] = dict(out[k])
    for k in ("attempts", "changes", "epochs"):
        if isinstance(out.get(k), list):
            out[k] = [dict(x) if isinstance(x, dict) else x for x in out[k]] if k != "epochs" else list(out[k])
    out.setdefault("updated_at", time.time())
    return out


def _count(snap: dict) -> int:
    """How many epochs the run has (the snapshot carries only the last few)."""
    return snap.get("epoch_count", len(snap.get("epochs") or []))


def _last_epoch(snap: dict | None):
    epochs = (snap or {}).get("epochs") or []
    return epochs[-1].get("epoch") if epochs and isinstance(epochs[-1], dict) else None


def _mark_for(item) -> str | None:
    """The picture marks a thermal pause and a stop someone asked for (the others show in state.json)."""
    if type(item).__name__ != "StateChanged":
        return None
    if item.new == "paused":
        return "thermal_pause"
    if item.new in ("stop_pending", "stopping") and item.cause in ("stopped", "preempted") and item.old != "stop_pending":
        return "stop"
    return None


class Sinks:
    def __init__(self, cfg, log, notifier=None, metrics: Metrics | None = None, plot_path: Path | None = None):
        self.cfg, self.log = cfg, log
        self.notifier, self.metrics, self.plot_path = notifier, metrics, plot_path
        self._last: dict | None = None
        self._plotted: tuple | None = None
        self._errors_logged: set[str] = set()
        self.marks: list[dict] = plot.load_marks(cfg.paths.state_dir) if plot_path else []
        self.metrics_worker = (Latest("metrics_textfile", lambda _snap: metrics.write_textfile(), log)
                               if metrics is not None and metrics.textfile is not None else None)
        self.plot_worker = Latest("plot", self._draw, log) if plot_path else None
        self._plot_next = 0.0

    @classmethod
    def open(cls, cfg, log, env=None) -> "Sinks":
        """Start what [notify] and [metrics] ask for; problems are logged, never raised."""
        notifier = metrics = None
        try:
            notifier = notify.build(cfg, log, env)
        except Exception as e:
            log.error("notify_unavailable", error=f"{type(e).__name__}: {e}")
        m = cfg.metrics
        if m.textfile or m.listen:
            textfile = None
            if m.textfile:
                textfile = Path(os.path.expanduser(m.textfile))
                textfile = textfile if textfile.is_absolute() else Path(cfg.path).parent / textfile
            from supervisor.integrations.metrics import Metrics  # prometheus_client only when metrics are asked for

            metrics = Metrics(textfile)
            if m.listen:
                try:
                    host, port = metrics.serve(m.listen)
                    log.info("metrics_listening", url=f"http://{m.listen.rpartition(':')[0]}:{port}/metrics")
                except (OSError, ValueError) as e:
                    log.error("metrics_listen_failed", listen=m.listen, error=str(e))
        return cls(cfg, log, notifier, metrics, plot.default_path(cfg) if m.plot else None)

    def _once(self, what: str, e: Exception) -> None:
        if what not in self._errors_logged:
            self._errors_logged.add(what)
            self.log.error(f"{what}_error", error=f"{type(e).__name__}: {e}")

    def publish(self, item, snap: dict | None = None) -> None:
        """For a decision or an epoch: maybe a notification, maybe a mark on the picture. Non-blocking."""
        snap = snap if snap is not None else self._last
        if self.notifier is not None:
            try:
                self.notifier.publish(item, snap)
            except Exception as e:  # a bug in an optional output must not stop training
                self._once("notify", e)
        kind = _mark_for(item)
        if self.plot_path is not None and kind is not None:
            self.marks.append({"kind": kind, "epoch": _last_epoch(snap), "at": time.time(),
                               "label": "requested" if kind == "stop" else None})
            del self.marks[:-MAX_MARKS]

    def snapshot(self, snap: dict) -> None:
        """After every state save: metrics now, the textfile and the picture in the background."""
        try:
            snap = _freeze(snap)
            self._last = snap
            if self.metrics is not None:
                self.metrics.update(snap)
                if self.metrics_worker is not None:
                    self.metrics_worker.submit(snap)
            if self.plot_worker is not None and snap.get("epochs"):
                key = (_count(snap), (snap.get("sup") or {}).get("outcome"), len(self.marks))
                now = time.monotonic()
                # at most one drawing per PLOT_MIN_INTERVAL_S (a 5 s epoch must not mean a redraw every 5 s),
                # and the final state always
                if key != self._plotted and (now >= self._plot_next or key[1] is not None):
                    self._plotted, self._plot_next = key, now + PLOT_MIN_INTERVAL_S
                    self.plot_worker.submit({**snap, "marks": list(self.marks)})
        except Exception as e:
            self._once("snapshot", e)

    def _draw(self, snap: dict) -> None:
        """Draw in a child process: matplotlib never enters the daemon (its memory and CPU stay small)."""
        state_dir = Path(self.cfg.paths.state_dir)
        marks_file = state_dir / plot.MARKS_FILE
        if snap["marks"]:
            fd, tmp = tempfile.mkstemp(prefix=f".{marks_file.name}.", dir=marks_file.parent)
            with os.fdopen(fd, "w") as fh:
                json.dump(snap["marks"], fh)
            os.replace(tmp, marks_file)
        fd, src = tempfile.mkstemp(prefix=".plot-snapshot.", suffix=".json", dir=state_dir)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({**snap, "epochs_dir": str(state_dir), "class_names": job.class_names(self.cfg)}, fh,
                          default=str)
            r = proc.run([sys.executable, "-m", "supervisor.integrations.plot", "--snapshot", src, str(self.plot_path)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         timeout=PLOT_TIMEOUT_S)
            if r.returncode != 0:
                raise RuntimeError((r.stderr or b"").decode(errors="replace").strip()[-300:] or f"exit {r.returncode}")
        finally:
            os.unlink(src)

    def close(self, timeout: float = 5.0) -> None:
        """Flush in order of importance (notifications, textfile, picture) within one deadline."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())
        try:
            if self.notifier is not None:
                self.notifier.close(left())
            if self.plot_worker is not None and self._last is not None and self._last.get("epochs"):
                key = (_count(self._last), (self._last.get("sup") or {}).get("outcome"), len(self.marks))
                if key != self._plotted:  # the last epochs, held back by the interval
                    self._plotted = key
                    self.plot_worker.submit({**self._last, "marks": list(self.marks)})
            for w in (self.metrics_worker, self.plot_worker):
                if w is not None:
                    w.close(left())
            if self.metrics is not None:
                self.metrics.close()
        except Exception as e:
            self._once("close", e)
