"""Notifications against real HTTP servers on 127.0.0.1 (webhook and Apprise json://)."""
import importlib.util
import json
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from supervisor.core.actions import Diagnosed, Spawn, StateChanged
from supervisor.core.events import EpochDone
from supervisor.core.training_log import EpochRecord
from supervisor.integrations import notices, notify
from supervisor.config.loader import parse
from supervisor.integrations.plot import example_snapshot
from supervisor.integrations.publish import Sinks

REQUIRED = ("event", "message", "dataset", "configuration", "fold", "epoch", "ema_dice", "best_ema_dice",
            "batch_size", "restarts", "host", "time")


class Hook:
    """A real HTTP server: records JSON posts; mode "ok", "500", "hang" (blocks until released) or
    "redirect" (answers `redirect` = (status, Location))."""

    def __init__(self, mode="ok", redirect=None):
        self.mode, self.bodies, self.requests, self.redirect = mode, [], [], redirect
        self.cv = threading.Condition()
        self.release = threading.Event()
        hook = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with hook.cv:
                    hook.requests.append((self.path, dict(self.headers)))
                    hook.times.append(time.monotonic())
                    if hook.mode == "ok":
                        hook.bodies.append(json.loads(data))
                    hook.cv.notify_all()
                if hook.mode == "hang":
                    hook.release.wait(30)
                if hook.mode == "redirect":
                    self.send_response(hook.redirect[0])
                    self.send_header("Location", hook.redirect[1])
                else:
                    self.send_response(200 if hook.mode == "ok" else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # what a client that turns a redirected POST into a GET would send
                with hook.cv:
                    hook.gets.append((self.path, dict(self.headers)))
                    hook.cv.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.gets, self.times = [], []
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def wait_requests(self, n, timeout=10):
        with self.cv:
            return self.cv.wait_for(lambda: len(self.requests) >= n, timeout)

    def stop(self):
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.stop()


class RecLog:
    """Captures every log call (level, event, fields), like the structlog logger the daemon passes."""

    def __init__(self):
        self.calls = []
        for level in ("debug", "info", "warning", "error"):
            setattr(self, level, lambda event, _l=level, **kw: self.calls.append((_l, event, kw)))

    def events(self, name):
        return [c for c in self.calls if c[1] == name]

    def text(self):
        return repr(self.calls)


def make_cfg(tmp_path, notify_sec=None, metrics_sec=None):
    raw = {"training": {"dataset": "Dataset001_CardiacSeg"},
           "paths": {"preprocessed": str(tmp_path), "results": str(tmp_path), "state_dir": str(tmp_path / "state")},
           "notify": notify_sec or {}, "metrics": {"plot": False, **(metrics_sec or {})}}
    (tmp_path / "state").mkdir(exist_ok=True)
    return parse(raw, tmp_path / "config.toml", env={})


SNAP = example_snapshot()


def moved(to, cause, frm="running", attempt=2, **detail):
    """A StateChanged as the policy makes it (core/transition.py)."""
    return StateChanged(frm, to, cause, attempt, detail)


def crash(attempt=2, restart=3):
    return moved("backoff", "crash", attempt=attempt, delay_s=40.0, restart=restart, budget_used=restart,
                 max_restarts=5, counted=True)


def gave_up(message="budget spent"):
    return moved("failed", "gave_up", frm="backoff", message=message, exit_code=3)


FAST = {"timeout_seconds": 2, "retries": 2, "backoff_seconds": 0.01}


def test_what_the_policy_decided_is_what_is_told():
    """Notifications follow the policy's decisions (StateChanged and the rest), never log event names."""
    assert notices.notice_for(gave_up())[0] == "gave_up"
    assert notices.notice_for(moved("failed", "config_error", message="m"))[0] == "config_error"
    assert notices.notice_for(moved("failed", "diverged", message="m"))[0] == "diverged"
    assert notices.notice_for(moved("done", "completed"))[0] == "completed"
    assert notices.notice_for(moved("done", "target_reached", frm="stopping"))[0] == "target_reached"
    assert notices.notice_for(moved("done", "stopped", frm="stopping")) is None      # the operator knows
    assert notices.notice_for(crash())[0] == "crash"
    assert notices.notice_for(moved("backoff", "cuda_oom", old=6, new=5))[0] == "cuda_oom"
    assert notices.notice_for(moved("backoff", "hang", frm="stopping"))[0] == "hang"
    assert notices.notice_for(moved("cooling", "thermal_stop", frm="stopping"))[0] == "thermal_stop"
    assert notices.notice_for(moved("paused", "thermal_pause"))[0] == "thermal_pause"
    assert notices.notice_for(moved("no_space", "disk_full"))[0] == "disk_full"
    assert notices.notice_for(moved("stop_pending", "target_reached")) is None       # not yet decided to be done
    assert notices.notice_for(Diagnosed({"bottleneck": "data_loading"}))[0] == "bottleneck"
    assert notices.notice_for(Spawn("checkpoint_latest.pth", resume=True))[0] == "started"
    assert notices.notice_for(EpochDone(EpochRecord(epoch=4)))[0] == "epoch"
    assert notices.notice_for("epoch abc") is None


def test_webhook_receives_target_crash_and_give_up(tmp_path, hook):
    log = RecLog()
    cfg = make_cfg(tmp_path, {"webhook": hook.url, "events": ["target_reached", "crash", "gave_up", "cuda_oom"],
                              **FAST})
    s = Sinks.open(cfg, log, env={})
    s.publish(moved("done", "target_reached", frm="stopping", message="attempt 2: target_reached"), SNAP)
    s.publish(crash(), SNAP)
    s.publish(moved("done", "stopped", frm="stopping"), SNAP)                        # not news
    s.publish(moved("backoff", "cuda_oom", old=6, new=5, restart=4), SNAP)
    s.publish(moved("backoff", "hang", frm="stopping", delay_s=10.0, restart=5), SNAP)  # not in events
    s.publish(gave_up("10 restarts within 360 min"), SNAP)
    s.close(timeout=10)  # the give-up message goes out before close returns
    events = [b["event"] for b in hook.bodies]
    assert events == ["target_reached", "crash", "cuda_oom", "gave_up"]
    for b in hook.bodies:
        assert set(REQUIRED) <= set(b), set(REQUIRED) - set(b)
        assert b["dataset"] == "Dataset001_CardiacSeg" and b["fold"] == 0
        assert datetime.fromisoformat(b["time"]).tzinfo is not None
    tgt, crashed, oom, gave = hook.bodies
    assert tgt["epoch"] == 79 and tgt["ema_dice"] == 0.7959 and "0.794" in tgt["message"]
    assert "stopped at a safe point" in tgt["message"]
    assert crashed["restarts"] == SNAP["sup"].get("restarts", 0) and "restart 3 in 40.0 s" in crashed["message"]
    assert oom["old_batch_size"] == 6 and oom["new_batch_size"] == 5 and oom["batch_size"] == 5
    assert "lowering it to 5" in oom["message"]
    assert "10 restarts" in gave["message"] and gave["best_ema_dice"] == max(e["ema"] for e in SNAP["epochs"])
    assert hook.requests[0][1]["Content-Type"] == "application/json"


def test_hanging_server_does_not_delay_the_caller(tmp_path):
    h = Hook("hang")
    try:
        log = RecLog()
        cfg = make_cfg(tmp_path, {"webhook": h.url, "events": ["crash", "gave_up"], "timeout_seconds": 30,
                                 "max_per_hour": 1000})
        s = Sinks.open(cfg, log, env={})
        t0 = time.perf_counter()
        s.publish(crash(attempt=1), SNAP)
        first = time.perf_counter() - t0
        assert h.wait_requests(1)  # the worker is now stuck inside the server
        t0 = time.perf_counter()
        for i in range(notify.QUEUE_MAX + 20):  # more than the queue holds: dropped and counted, not blocking
            s.publish(crash(attempt=i), SNAP)
        many = time.perf_counter() - t0
        assert first < 0.05 and many < 0.5, (first, many)
        assert s.notifier.dropped_full >= 20 and len(log.events("notify_queue_full")) == 1
        t0 = time.perf_counter()
        s.close(timeout=0.3)  # bounded even though the server never answers
        assert time.perf_counter() - t0 < 2.0
        assert log.events("notify_unsent") or log.events("notify_failed")
    finally:
        h.stop()


def test_server_500_is_retried_with_backoff_and_logged_once(tmp_path):
    h = Hook("500")
    try:
        log = RecLog()
        cfg = make_cfg(tmp_path, {"webhook": h.url, "events": ["crash", "gave_up"], **FAST})
        s = Sinks.open(cfg, log, env={})
        t0 = time.perf_counter()
        s.publish(crash(attempt=1), SNAP)
        s.publish(crash(attempt=2), SNAP)
        assert time.perf_counter() - t0 < 0.05
        assert h.wait_requests(6)  # 1 try + 2 retries, for each message
        h.mode = "ok"
        s.publish(gave_up("budget spent"), SNAP)
        s.close(timeout=10)
        assert [b["event"] for b in h.bodies] == ["gave_up"]
        failed = log.events("notify_failed")
        assert len(failed) == 1 and failed[0][2]["tries"] == 3 and "500" in failed[0][2]["error"]
        assert log.events("notify_recovered")[0][2]["lost"] == 2
    finally:
        h.stop()


def test_rate_limit_drops_and_counts_but_final_outcomes_pass(tmp_path, hook):
    log = RecLog()
    cfg = make_cfg(tmp_path, {"webhook": hook.url, "events": ["crash", "gave_up"], "max_per_hour": 2, **FAST})
    s = Sinks.open(cfg, log, env={})
    for i in range(5):
        s.publish(crash(attempt=i), SNAP)
    s.publish(gave_up("x"), SNAP)
    s.close(timeout=10)
    assert [b["event"] for b in hook.bodies] == ["crash", "crash", "gave_up"]
    assert s.notifier.dropped_rate == 3 and len(log.events("notify_rate_limited")) == 1


def test_epoch_digest_every_n_and_started_once(tmp_path, hook):
    cfg = make_cfg(tmp_path, {"webhook": hook.url, "events": ["epoch", "started"], "epoch_every": 5, **FAST})
    s = Sinks.open(cfg, RecLog(), env={})
    s.publish(Spawn("checkpoint_latest.pth", resume=True), SNAP)
    s.publish(Spawn("checkpoint_latest.pth", resume=True), SNAP)                    # started: once per process
    for ep in range(11):
        s.publish(EpochDone(EpochRecord(epoch=ep)), SNAP)
    s.close(timeout=10)
    assert [(b["event"], b["epoch"]) for b in hook.bodies][1:] == [("epoch", 0), ("epoch", 5), ("epoch", 10)]
    assert hook.bodies[0]["event"] == "started" and "checkpoint_latest" in hook.bodies[0]["message"]


def test_apprise_json_url(tmp_path, hook):
    pytest.importorskip("apprise")
    log = RecLog()
    cfg = make_cfg(tmp_path, {"urls": [f"json://127.0.0.1:{hook.port}/"], **FAST})
    s = Sinks.open(cfg, log, env={})
    s.publish(gave_up("CUDA OOM at batch size 1"), SNAP)
    s.close(timeout=15)
    assert len(hook.bodies) == 1, log.calls
    b = hook.bodies[0]
    assert "gave_up" in b["title"] and "CUDA OOM at batch size 1" in b["message"]


def test_urls_file_readable_by_others_is_refused(tmp_path, hook):
    f = tmp_path / "notify-urls"
    f.write_text(f"# tokens\nwebhook={hook.url}\n")
    f.chmod(0o644)
    cfg = make_cfg(tmp_path, {"urls_file": "notify-urls", **FAST})
    _, hooks, problems = notify.load_urls(cfg, env={})
    assert hooks == [] and len(problems) == 1
    assert "refused" in problems[0] and "0644" in problems[0] and f"chmod 600 {f}" in problems[0]
    assert ("fatal", problems[0]) in notify.check_findings(cfg, env={})
    log = RecLog()
    s = Sinks.open(cfg, log, env={})
    assert s.notifier is None and log.events("notify_config_problem")
    f.chmod(0o600)
    s = Sinks.open(cfg, RecLog(), env={})
    s.publish(gave_up("m"), SNAP)
    s.close(timeout=10)
    assert [b["event"] for b in hook.bodies] == ["gave_up"]
    assert notify.check_findings(cfg, env={})[0][0] == "ok"


def test_systemd_credential_is_read(tmp_path, hook):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "notify-urls").write_text(f"webhook={hook.url}\n")
    cfg = make_cfg(tmp_path, {**FAST})
    assert notify.load_urls(cfg, env={})[1] == []
    s = Sinks.open(cfg, RecLog(), env={"CREDENTIALS_DIRECTORY": str(creds)})
    s.publish(moved("done", "completed", message="m"), SNAP)
    s.close(timeout=10)
    assert [b["event"] for b in hook.bodies] == ["completed"]


def test_credentials_never_appear_in_log_output(tmp_path, caplog, capsys):
    h = Hook("500")
    try:
        secret_hook = f"http://alice:S3cretPass@127.0.0.1:{h.port}/hook/TOKENxyz123?key=QUERYsecret"
        secrets = ["S3cretPass", "TOKENxyz123", "QUERYsecret", "APPtoken42", "BOGUSsecret9"]
        urls = ["json://bob:APPtoken42@127.0.0.1:1/", "nosuchscheme://BOGUSsecret9/x"]
        cfg = make_cfg(tmp_path, {"webhook": secret_hook, "urls": urls, "events": ["crash"], **FAST})
        log = RecLog()
        s = Sinks.open(cfg, log, env={})
        s.publish(crash(attempt=1), SNAP)
        s.close(timeout=10)
        assert h.requests and h.requests[0][0] == "/hook/TOKENxyz123?key=QUERYsecret"
        assert h.requests[0][1]["Authorization"].startswith("Basic ")  # userinfo sent as auth, not lost
        have_apprise = importlib.util.find_spec("apprise") is not None
        # webhook (500) and, with the extra installed, apprise (connection refused)
        assert len(log.events("notify_failed")) == (2 if have_apprise else 1)
        assert log.events("notify_enabled")
        if "apprise" in sys.modules:
            assert log.events("notify_url_rejected")
        text = log.text() + repr(notify.check_findings(cfg, env={}))
        text += caplog.text + "".join(capsys.readouterr())  # Apprise's own `logging` output too
        for sec in secrets:
            assert sec not in text, sec
        assert f"127.0.0.1:{h.port}" in text  # what may be shown still is
    finally:
        h.stop()


def test_check_says_when_apprise_extra_is_missing(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, {"urls": ["ntfy://ntfy.sh/mytopic"]})
    monkeypatch.setitem(sys.modules, "apprise", None)  # import apprise -> ImportError
    found = notify.check_findings(cfg, env={})
    assert any(level == "fatal" and "pip install 'cardiacseg-train[notify]'" in text for level, text in found)
    log = RecLog()
    assert Sinks.open(cfg, log, env={}).notifier is None
    assert log.events("notify_apprise_missing")
    assert notify.check_findings(make_cfg(tmp_path), env={}) == []  # nothing configured: nothing said


# ---- hostile servers: every call bounded, nothing leaked -------------------------------------------------
class Trickler:
    """A real TCP server on 127.0.0.1 that reads the request, then answers one byte every `every` s for ever
    ("HTTP/1.1 200 OK\\r\\nX-Slow: aaaa..."): each byte comes long before any read timeout, the answer never
    ends. Records each connection's (start, end, bytes sent); the end is when the client cut it. `endless`
    instead sends a complete 200 header with a huge Content-Length and a body as fast as it can."""

    def __init__(self, every=0.2, endless=False):
        import socket
        self.every, self.endless = every, endless
        self.conns: list[dict] = []
        self.cv = threading.Condition()
        self.stop_ev = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop_ev.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        rec = {"start": time.monotonic(), "end": None, "sent": 0}
        with self.cv:
            self.conns.append(rec)
            self.cv.notify_all()
        try:
            data = b""
            while b"\r\n\r\n" not in data:  # the request's head (the body, if any, is never read)
                chunk = c.recv(65536)
                if not chunk:
                    raise OSError("closed")
                data += chunk
            if self.endless:
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
                block = b"x" * 65536
                while not self.stop_ev.is_set():
                    c.sendall(block)
                    rec["sent"] += len(block)
            else:
                head = b"HTTP/1.1 200 OK\r\nX-Slow: "
                while not self.stop_ev.is_set():
                    c.sendall(head[:1] if head else b"a")
                    head = head[1:]
                    rec["sent"] += 1
                    self.stop_ev.wait(self.every)  # the server's pace, not a synchronisation
        except OSError:
            pass
        finally:
            rec["end"] = time.monotonic()
            c.close()
            with self.cv:
                self.cv.notify_all()

    def wait(self, pred, timeout=30):
        with self.cv:
            return self.cv.wait_for(lambda: pred(self.conns), timeout)

    def stop(self):
        self.stop_ev.set()
        self.sock.close()


def ended(n):
    return lambda conns: len([c for c in conns if c["end"] is not None]) >= n


def creds_with_hooks(tmp_path, *urls):
    """A systemd credential folder with one `webhook=` line per URL (config holds only one webhook)."""
    d = tmp_path / "creds"
    d.mkdir(exist_ok=True)
    (d / "notify-urls").write_text("".join(f"webhook={u}\n" for u in urls))
    return {"CREDENTIALS_DIRECTORY": str(d)}


def test_a_trickling_webhook_is_cut_at_the_deadline_and_holds_no_other_target(tmp_path, hook):
    """One byte every 0.2 s, for ever: each try ends at its total deadline (not a per-read timeout, which the
    trickle would defeat), and the good endpoint gets every message while the trickler is still being tried."""
    slow = Trickler()
    try:
        log = RecLog()
        deadline = 1.0
        cfg = make_cfg(tmp_path, {"events": ["crash", "gave_up"], "timeout_seconds": deadline, "retries": 1,
                                  "backoff_seconds": 0.01, "max_per_hour": 1000})
        s = Sinks.open(cfg, log, env=creds_with_hooks(tmp_path, slow.url, hook.url))
        assert [t.name for t in s.notifier.targets] == [notify.redact(slow.url), notify.redact(hook.url)]
        s.publish(crash(attempt=1), SNAP)
        assert hook.wait_requests(1)
        assert slow.wait(ended(2), timeout=deadline * 2 + 30), slow.conns  # the try and its retry, both cut
        assert hook.times[0] < slow.conns[0]["end"]  # the good target did not wait for the trickler's try
        for c in slow.conns[:2]:
            assert c["end"] - c["start"] <= deadline + 5 and c["sent"] >= 3, c  # it trickled, then was cut
        failed = log.events("notify_failed")
        assert len(failed) == 1 and failed[0][2]["target"] == notify.redact(slow.url)
        assert "DeadlineExceeded" in failed[0][2]["error"] and failed[0][2]["tries"] == 2
        s.publish(crash(attempt=2), SNAP)
        s.publish(gave_up("budget spent"), SNAP)
        assert hook.wait_requests(3)  # both, without waiting for the trickler's tries
        s.close(timeout=1)
        assert [b["event"] for b in hook.bodies] == ["crash", "crash", "gave_up"]
    finally:
        slow.stop()


def test_the_last_message_before_exit_is_not_held_by_a_slow_target(tmp_path, hook):
    """close(): one deadline for all targets; the trickler (30 s per try) holds only its own queue."""
    slow = Trickler()
    try:
        log = RecLog()
        cfg = make_cfg(tmp_path, {"events": ["gave_up"], "timeout_seconds": 30, "retries": 0})
        s = Sinks.open(cfg, log, env=creds_with_hooks(tmp_path, slow.url, hook.url))
        s.publish(gave_up("10 restarts within 360 min"), SNAP)
        assert slow.wait(lambda conns: len(conns) >= 1)  # the trickler's try is under way
        t0 = time.monotonic()
        s.close(timeout=3)
        assert time.monotonic() - t0 < 3 + 5
        assert [b["event"] for b in hook.bodies] == ["gave_up"]
        unsent = log.events("notify_unsent")
        assert unsent and unsent[0][2]["targets"] == [notify.redact(slow.url)]
    finally:
        slow.stop()


def test_a_slow_apprise_url_is_abandoned_at_the_deadline_one_thread_at_most(tmp_path, hook):
    """Apprise's own I/O cannot be cut: the try is abandoned at its deadline, the next one waits for it
    within its own deadline, so a hung URL never holds the others and never piles up threads."""
    pytest.importorskip("apprise")
    slow = Trickler()
    try:
        log = RecLog()
        cfg = make_cfg(tmp_path, {"urls": [f"json://127.0.0.1:{slow.port}/"], "events": ["crash"],
                                  "timeout_seconds": 1, "retries": 0, "max_per_hour": 1000})
        s = Sinks.open(cfg, log, env=creds_with_hooks(tmp_path, hook.url))
        assert len(s.notifier.targets) == 2
        for i in range(4):
            s.publish(crash(attempt=i), SNAP)
        assert hook.wait_requests(4)
        s.close(timeout=10)  # 4 tries of at most 1 s each on the apprise URL
        w = s.notifier.workers[1]
        assert w.failed == 4 and w.pending == 0, (w.failed, w.pending, log.calls)
        errors = [c[2]["error"] for c in log.events("notify_try_failed")]
        assert errors and all("DeadlineExceeded" in e for e in errors), errors
        assert slow.wait(lambda conns: len(conns) == 1, timeout=0)  # one abandoned try, never a second
        alive = [t for t in threading.enumerate() if t.name == "cardiacseg-apprise-try"]
        assert len(alive) <= 1
    finally:
        slow.stop()


def test_reply_bodies_are_read_up_to_a_bound(tmp_path):
    """A 200 with a body that never ends: delivered at once (the status is all that is read, up to
    REPLY_MAX bytes); reading it whole would run into the deadline and fail."""
    big = Trickler(endless=True)
    try:
        log = RecLog()
        cfg = make_cfg(tmp_path, {"webhook": big.url, "events": ["gave_up"], "timeout_seconds": 5, "retries": 0})
        s = Sinks.open(cfg, log, env={})
        s.publish(gave_up("m"), SNAP)
        s.close(timeout=10)
        assert s.notifier.delivered == 1 and not log.events("notify_failed"), log.calls
        assert big.wait(ended(1))  # the client hung up on the endless body
    finally:
        big.stop()


@pytest.mark.parametrize("status", [307, 308])
def test_a_redirect_to_another_origin_never_carries_credentials(tmp_path, hook, status):
    """307/308 keep the POST and its body and are followed; the Basic auth from user:password@ goes only to
    the configured origin (another port is another origin), and user:password in a Location is ignored."""
    other = hook  # records what it received
    loc = f"http://mallory:LOCsecret@127.0.0.1:{other.port}/final"
    r = Hook("redirect", redirect=(status, loc))
    try:
        log = RecLog()
        url = f"http://alice:S3cretPass@127.0.0.1:{r.port}/hook"
        cfg = make_cfg(tmp_path, {"webhook": url, "events": ["gave_up"], **FAST})
        s = Sinks.open(cfg, log, env={})
        s.publish(gave_up("m"), SNAP)
        s.close(timeout=10)
        assert r.requests[0][1]["Authorization"].startswith("Basic ")  # the configured origin gets it
        assert [p for p, _ in other.requests] == ["/final"] and [b["event"] for b in other.bodies] == ["gave_up"]
        assert "Authorization" not in other.requests[0][1], other.requests[0][1]
        assert s.notifier.delivered == 1 and not log.events("notify_failed")
    finally:
        r.stop()


def test_a_same_origin_redirect_keeps_the_credentials(tmp_path, hook):
    same = Hook("redirect", redirect=(308, "/moved"))
    try:
        url = f"http://alice:S3cretPass@127.0.0.1:{same.port}/hook"
        s = Sinks.open(make_cfg(tmp_path, {"webhook": url, "events": ["gave_up"], **FAST}), RecLog(), env={})
        s.publish(gave_up("m"), SNAP)
        s.close(timeout=10)
        paths = [p for p, _ in same.requests]
        assert paths[:2] == ["/hook", "/moved"] and all("Authorization" in h for _, h in same.requests)
    finally:
        same.stop()


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_would_drop_the_body_is_a_failed_delivery(tmp_path, hook, status):
    """301/302/303 would turn the POST into a GET without the body: not followed, not counted delivered."""
    r = Hook("redirect", redirect=(status, f"http://127.0.0.1:{hook.port}/final"))
    try:
        log = RecLog()
        url = f"http://alice:S3cretPass@127.0.0.1:{r.port}/hook"
        s = Sinks.open(make_cfg(tmp_path, {"webhook": url, "events": ["gave_up"], **FAST}), log, env={})
        s.publish(gave_up("m"), SNAP)
        s.close(timeout=10)
        assert hook.requests == [] and hook.gets == []  # nothing reached the other origin, not even a GET
        assert s.notifier.delivered == 0 and s.notifier.failed == 1
        err = log.events("notify_failed")[0][2]["error"]
        assert f"HTTP {status}" in err and "not followed" in err and "S3cretPass" not in err
    finally:
        r.stop()


def test_the_webhook_goes_through_the_environments_proxy(tmp_path, hook, monkeypatch):
    """$http_proxy is honoured as urllib did (the proxy gets the absolute URL, and the credentials of the
    proxy's URL as Proxy-Authorization), and $no_proxy exempts a host. `hook` plays the proxy."""
    monkeypatch.setenv("http_proxy", f"http://proxyuser:PXsecret@127.0.0.1:{hook.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = "http://alice:S3cretPass@hooks.example.invalid:8080/cardiacseg"
    log = RecLog()
    s = Sinks.open(make_cfg(tmp_path, {"webhook": url, "events": ["gave_up"], **FAST}), log, env={})
    s.publish(gave_up("m"), SNAP)
    s.close(timeout=10)
    assert [p for p, _ in hook.requests] == ["http://hooks.example.invalid:8080/cardiacseg"], log.calls
    h = hook.requests[0][1]
    assert h["Proxy-Authorization"].startswith("Basic ") and h["Authorization"].startswith("Basic ")
    assert s.notifier.delivered == 1
    direct = Hook()
    try:
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        s = Sinks.open(make_cfg(tmp_path, {"webhook": direct.url, "events": ["gave_up"], **FAST}), log, env={})
        s.publish(gave_up("m"), SNAP)
        s.close(timeout=10)
        assert len(hook.requests) == 1 and [p for p, _ in direct.requests] == ["/hook"]  # not through the proxy
        assert "Proxy-Authorization" not in direct.requests[0][1]
    finally:
        direct.stop()
