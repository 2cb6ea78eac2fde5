"""Prometheus metrics ([metrics]): a node_exporter textfile and an optional loopback /metrics endpoint.

How it works
- One private `CollectorRegistry` (never the process-global one) holds one custom collector,
  `SnapshotCollector`, that turns the newest state snapshot (the dict the daemon writes to state.json)
  into metric families when scraped or written. Replacing the snapshot is one reference assignment, so a
  scrape always sees one consistent snapshot and a label that disappeared (a class, a GPU) is gone
  rather than stale.
- `write_textfile()` renders the registry with prometheus_client's `write_to_textfile`, which writes a
  temp file next to the target and renames it over it (node_exporter never reads half a file). The
  glue (sinks.py) calls it from a worker thread after every state save and epoch.
- `serve(addr)` starts prometheus_client's own threaded HTTP server on a loopback HOST:PORT (the config
  refuses other addresses: the endpoint has no authentication).
- Names follow Prometheus conventions: base units (seconds, celsius), `_total` for the counter, one
  `cardiacseg_train_state{state}` series per state with 1 for the current one, and the job's identity in
  `cardiacseg_train_info`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from supervisor.core.record import State

STATES = tuple(s.value for s in State)  # every state of the decision core, one label each


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _gauge(name: str, doc: str, value) -> GaugeMetricFamily | None:
    v = _num(value)
    return None if v is None else GaugeMetricFamily(name, doc, value=v)


def _temps(snap: dict) -> list[tuple[str, str, float]]:
    """(gpu, uuid, celsius) from `temps` {gpu: celsius | {celsius, uuid}} (top level or in `sup`)."""
    temps = snap.get("temps") or (snap.get("sup") or {}).get("temps") or {}
    uuids = snap.get("gpu_uuids") or {}
    out = []
    for gpu, v in sorted(temps.items(), key=lambda kv: str(kv[0])):
        uuid = uuids.get(str(gpu), "")
        if isinstance(v, dict):
            uuid, v = v.get("uuid") or uuid, v.get("celsius")
        if _num(v) is not None:
            out.append((str(gpu), str(uuid), float(v)))
    return out


def families(snap: dict, now: float | None = None) -> list:
    """Every metric family for one snapshot; a missing key leaves its metric out, never raises."""
    jb, sup, settings = snap.get("job") or {}, snap.get("sup") or {}, snap.get("settings") or {}
    epochs = snap.get("epochs") or []
    last = epochs[-1] if epochs else {}
    out = []
    info = InfoMetricFamily("cardiacseg_train", "The supervised nnU-Net job.")
    info.add_metric([], {k: "" if jb.get(k) is None else str(jb.get(k))
                         for k in ("dataset", "configuration", "fold", "trainer", "plans")})
    out.append(info)
    emas = [e for e in (_num(r.get("ema")) for r in epochs) if e is not None]
    out += [
        _gauge("cardiacseg_train_epoch", "Last completed epoch (nnU-Net numbering, from 0).", last.get("epoch")),
        _gauge("cardiacseg_train_ema_pseudo_dice", "EMA of the mean foreground pseudo Dice after the last epoch.",
               last.get("ema")),
        _gauge("cardiacseg_train_best_ema_pseudo_dice", "Best EMA pseudo Dice so far.",
               snap["best_ema"] if "best_ema" in snap else (max(emas) if emas else None)),
        _gauge("cardiacseg_train_target_pseudo_dice", "The EMA pseudo Dice at which training stops.",
               settings.get("ema_dice")),
        _gauge("cardiacseg_train_epoch_duration_seconds", "Wall time of the last epoch.", last.get("epoch_time")),
        _gauge("cardiacseg_train_batch_size", "Batch size in the plans file (lowered after CUDA OOM).",
               sup.get("batch_size")),
    ]
    dice = GaugeMetricFamily("cardiacseg_train_pseudo_dice", "Pseudo Dice of each foreground class in the last "
                             "epoch (class = label index).", labels=["class"])
    for i, d in enumerate(last.get("dice") or []):
        if _num(d) is not None:
            dice.add_metric([str(i + 1)], d)
    out.append(dice)
    # the policy's own count (Sup.restart_reasons): what status and the notifications show too
    reasons = sup.get("restart_reasons") if isinstance(sup.get("restart_reasons"), dict) else {}
    restarts = CounterMetricFamily("cardiacseg_train_restarts", "Restarts of the trainer, by the reason the "
                                   "previous attempt ended.", labels=["reason"])
    for reason, n in sorted(reasons.items()):
        if isinstance(n, int):
            restarts.add_metric([str(reason)], n)
    out.append(restarts)
    current = sup.get("state", "idle")
    state = GaugeMetricFamily("cardiacseg_train_state", "1 for the supervisor's current state, else 0.",
                              labels=["state"])
    for s in STATES if current in STATES else (*STATES, str(current)):
        state.add_metric([s], 1.0 if s == current else 0.0)
    out.append(state)
    out.append(GaugeMetricFamily("cardiacseg_train_paused", "1 while training is paused for heat (SIGSTOP).",
                                 value=1.0 if current == "paused" else 0.0))
    gpu = GaugeMetricFamily("cardiacseg_gpu_temperature_celsius", "Last temperature reading of a watched GPU.",
                            labels=["gpu", "uuid"])
    for idx, uuid, c in _temps(snap):
        gpu.add_metric([idx, uuid], c)
    out.append(gpu)
    updated = _num(snap.get("updated_at"))
    out.append(GaugeMetricFamily("cardiacseg_train_last_update_timestamp_seconds", "Unix time of the state "
                                 "this was computed from.", value=updated if updated is not None else
                                 (time.time() if now is None else now)))
    return [m for m in out if m is not None]


class SnapshotCollector:
    """A prometheus_client collector over the newest snapshot (swapped atomically by `update`)."""

    def __init__(self):
        self.snap: dict = {}

    def update(self, snap: dict) -> None:
        self.snap = snap

    def collect(self):
        return iter(families(self.snap))


class Metrics:
    """The private registry, the textfile writer and the optional HTTP endpoint."""

    def __init__(self, textfile: Path | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SnapshotCollector()
        self.registry.register(self.collector)
        self.textfile = Path(textfile) if textfile else None
        self.server = None
        self.address: tuple[str, int] | None = None

    def update(self, snap: dict) -> None:
        self.collector.update(snap)

    def write_textfile(self) -> None:
        """Atomic (temp file + rename, by prometheus_client). Raises OSError; the caller logs it."""
        if self.textfile is not None:
            write_to_textfile(str(self.textfile), self.registry)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on a loopback `HOST:PORT` (port 0: any free port). Raises OSError."""
        from prometheus_client import start_http_server
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        self.server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        self.address = self.server.server_address[:2]
        return self.address

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def check_findings(cfg) -> list[tuple[str, str]]:
    """For `check`: is the textfile's folder writable, is the listen address free."""
    import os
    import socket
    out = []
    m = cfg.metrics
    if m.textfile:
        p = Path(os.path.expanduser(m.textfile))
        p = p if p.is_absolute() else Path(cfg.path).parent / p
        if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
            out.append(("warning", f"metrics.textfile: cannot write into {p.parent} (no metrics file)"))
        else:
            out.append(("ok", f"metrics: textfile {p}"))
    if m.listen:
        host, _, port = m.listen.rpartition(":")
        host = host.strip("[]")
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, int(port)))
        except OSError as e:
            out.append(("warning", f"metrics.listen {m.listen}: cannot listen: {e.strerror or e} "
                                   "(a running supervisor may hold it)"))
        else:
            out.append(("ok", f"metrics: http://{m.listen}/metrics"))
    return out
