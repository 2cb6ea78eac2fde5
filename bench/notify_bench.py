#!/usr/bin/env python3
"""Notifications against a trickling webhook: is every try cut at its deadline, and does the good endpoint
get every message on time?

    .venv/bin/python bench/notify_bench.py [--seconds 15] [--every 0.5] [--timeout 2] [--json FILE]

Two real HTTP servers on 127.0.0.1: a trickler (reads the request, then answers one byte every 0.2 s for
ever: each byte comes long before any read timeout, the answer never ends) and a good one (answers 200 at
once). The supervisor's own Sinks/Notifier is configured with both as webhooks (`timeout_seconds`
= --timeout, retries 0) and fed a `crash` decision every --every seconds for --seconds, then a `gave_up`
and close(5 s), as the daemon does before it exits. Reported: the tries the trickler saw, how long each
lasted (from the server's side: accept to the moment the client cut it) against the deadline, and for the
good endpoint the messages received and their delay from publish() to arrival.
"""
from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.config.loader import parse  # noqa: E402
from supervisor.core.actions import StateChanged  # noqa: E402
from supervisor.integrations.plot import example_snapshot  # noqa: E402
from supervisor.integrations.publish import Sinks  # noqa: E402


class Trickler:
    def __init__(self, every: float = 0.2):
        self.every, self.tries, self.stop_ev = every, [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        rec = {"start": time.monotonic(), "end": None, "bytes": 0}
        self.tries.append(rec)
        try:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    raise OSError
                data += chunk
            head = b"HTTP/1.1 200 OK\r\nX-Slow: "
            while not self.stop_ev.is_set():
                c.sendall(head[:1] if head else b"a")
                head, rec["bytes"] = head[1:], rec["bytes"] + 1
                if select.select([c], [], [], self.every)[0] and not c.recv(65536):  # EOF: the client cut it
                    break
        except OSError:
            pass
        finally:
            rec["end"] = time.monotonic()
            c.close()


class Good:
    def __init__(self):
        self.got: dict[int, float] = {}
        self.events: list[str] = []
        good = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                b = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                good.events.append(b["event"])
                if b["event"] == "crash":
                    good.got[b["details"]["attempt"]] = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()


class Log:
    def __init__(self):
        self.calls = []
        for level in ("debug", "info", "warning", "error"):
            setattr(self, level, lambda event, _l=level, **kw: self.calls.append((_l, event, kw)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    slow, good, log = Trickler(), Good(), Log()
    tmp = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    (tmp / "creds").mkdir()
    (tmp / "creds" / "notify-urls").write_text(f"webhook={slow.url}\nwebhook={good.url}\n")
    cfg = parse({"training": {"dataset": "Dataset001_CardiacSeg"},
                 "paths": {"preprocessed": str(tmp), "results": str(tmp), "state_dir": str(tmp)},
                 "notify": {"events": ["crash", "gave_up"], "timeout_seconds": a.timeout, "retries": 0,
                            "max_per_hour": 100000},
                 "metrics": {"plot": False}}, tmp / "config.toml", env={})
    sinks = Sinks.open(cfg, log, env={"CREDENTIALS_DIRECTORY": str(tmp / "creds")})
    snap, published = example_snapshot(), {}
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < a.seconds:
        published[i] = time.monotonic()
        sinks.publish(StateChanged("running", "backoff", "crash", i, {"delay_s": 1.0, "restart": i}), snap)
        i += 1
        time.sleep(max(0.0, t0 + i * a.every - time.monotonic()))  # the events' pace
    sinks.publish(StateChanged("backoff", "failed", "gave_up", i, {"message": "bench over", "exit_code": 3}), snap)
    tc = time.monotonic()
    sinks.close(5)
    close_s = time.monotonic() - tc
    for w in sinks.notifier.workers:  # the try cut at close's deadline logs just after it: wait for that line
        w.thread.join(2)
    slow.stop_ev.set()
    run_s = time.monotonic() - t0
    during = [r for r in slow.tries if r["start"] < tc]  # tries begun while events arrived (the rest: in close)
    server = [r["end"] - r["start"] for r in slow.tries if r["end"] is not None]
    client = [c[2]["seconds"] for c in log.calls if c[1] == "notify_try_failed"]
    errors = sorted({c[2]["error"].split(":")[0] for c in log.calls if c[1] == "notify_try_failed"})
    delays = [good.got[k] - published[k] for k in published if k in good.got]
    res = {
        "run_s": round(run_s, 2), "deadline_s": a.timeout, "published": len(published) + 1,
        "trickler_tries": len(slow.tries), "trickler_tries_before_close": len(during),
        "trickler_try_s_server": {"min": round(min(server), 3), "max": round(max(server), 3)} if server else None,
        "trickler_try_s_client": {"n": len(client), "min": min(client), "max": max(client)} if client else None,
        "trickler_try_errors": errors,
        "trickler_bytes_per_try": sorted({r["bytes"] for r in slow.tries}),
        "good_received": len(good.events), "good_missing": sorted(set(published) - set(good.got)),
        "good_got_gave_up": "gave_up" in good.events,
        "good_delay_ms": {"median": round(statistics.median(delays) * 1e3, 1),
                          "max": round(max(delays) * 1e3, 1)} if delays else None,
        "close_s": round(close_s, 2),
        "unsent_at_close": [c[2]["messages"] for c in log.calls if c[1] == "notify_unsent"],
    }
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
