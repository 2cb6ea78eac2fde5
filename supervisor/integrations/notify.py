"""Notifications ([notify]): tell a person when the job needs them, without ever blocking the loop.

How it works
- notices.py: `notice_for(item)` maps what the policy decided to a notification kind and its fields: a StateChanged
  (into FAILED: gave_up / config_error / diverged; into DONE: completed / target_reached / preempted;
  into BACKOFF: crash / hang / cuda_oom, with the restart it scheduled; into PAUSED: thermal_pause; into
  COOLING: thermal_stop; into NO_SPACE: disk_full), a Diagnosed verdict (bottleneck), a Spawn that
  started the first attempt of this process (started), and every `epoch_every`-th EpochDone (epoch).
  Log event names play no part. `Notifier.publish` keeps only the kinds listed in `notify.events`.
- notices.py: `body(kind, fields, snap)` builds the JSON the webhook receives (event, message, dataset, configuration,
  fold, epoch, ema_dice, best_ema_dice, batch_size, restarts, host, time, ...). Apprise gets
  `title` and `message` of the same body.
- `Notifier.publish` runs on the loop thread and only does cheap work: map, rate limit (a sliding hour
  of `max_per_hour`; final outcomes always pass), and a non-blocking put on a bounded queue (full:
  dropped and counted). One worker thread delivers each message to every target, each try with
  `timeout_seconds`, retried `retries` times with a doubling backoff. A target that starts failing is
  logged once (not per try, not per message) and once more when it works again, with the count lost.
- `close(timeout)` lets the worker drain the queue (cutting backoff waits short) until the deadline, so
  the message about a give-up is sent before the process exits; the worker is a daemon thread, so a
  hung server never keeps the process alive.
- Secrets: URLs come from `notify.urls`, `urls_file` (refused when others can read or anyone else can
  write it) and systemd's `LoadCredential=` ($CREDENTIALS_DIRECTORY/<credential>). Log lines only
  ever carry `redact(url)` (scheme and, for http(s), host), and error texts are scrubbed of the URLs.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import queue
import re
import stat
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path

from supervisor.integrations.notices import body, notice_for

QUEUE_MAX = 100
FINAL = frozenset({"gave_up", "config_error", "completed", "target_reached", "diverged"})
_STOP = object()


# ---- secrets ------------------------------------------------------------------------------------
def redact(url: str) -> str:
    """What a log line may show of a URL: the scheme, and for http(s) the host and port."""
    try:
        p = urllib.parse.urlsplit(url)
        if p.scheme in ("http", "https") and p.hostname:
            port = f":{p.port}" if p.port else ""
            return f"{p.scheme}://{p.hostname}{port}/..."
    except ValueError:
        pass
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return f"{scheme}://..." if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,31}", scheme) else "<url>"


def _resolve(cfg, p: str) -> Path:
    q = Path(os.path.expanduser(p))
    return q if q.is_absolute() else Path(cfg.path).parent / q


def _parse_lines(text: str, urls: list[str], hooks: list[str]) -> None:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("webhook="):
            hooks.append(line[len("webhook="):].strip())
        else:
            urls.append(line)


def load_urls(cfg, env=None) -> tuple[list[str], list[str], list[str]]:
    """(apprise urls, webhook urls, problems) from the config, urls_file and the systemd credential."""
    env = os.environ if env is None else env
    n = cfg.notify
    urls, hooks, problems = list(n.urls), [n.webhook] if n.webhook else [], []
    if n.urls_file:
        path = _resolve(cfg, n.urls_file)
        try:
            st = path.stat()
            # group-readable is allowed (root:cardiacseg 0640); others reading, or others writing, is not
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
                problems.append(f"notify.urls_file {path}: refused, mode {stat.S_IMODE(st.st_mode):04o} lets "
                                f"others read or change it (it holds tokens): chmod 600 {path}")
            else:
                _parse_lines(path.read_text(), urls, hooks)
        except OSError as e:
            problems.append(f"notify.urls_file {path}: cannot read: {e.strerror or e}")
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds:
        path = Path(creds) / n.credential
        try:
            _parse_lines(path.read_text(), urls, hooks)
        except FileNotFoundError:
            pass  # the credential is optional: a unit without LoadCredential= has none
        except OSError as e:
            problems.append(f"credential {n.credential}: cannot read: {e.strerror or e}")
    bad = [h for h in hooks if not h.startswith(("http://", "https://"))]
    problems += [f"webhook {redact(h)}: expected an http:// or https:// URL" for h in bad]
    return urls, [h for h in hooks if h not in bad], problems


def _scrub(text: str, secrets: list[str]) -> str:
    """Replace each URL, and each part of it that may be a token, in an error text."""
    for s in secrets:
        text = text.replace(s, redact(s))
        rest = s.split("://", 1)[-1]
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        parts = [rest, userinfo, *userinfo.split(":"), *re.split(r"[/?&=#@:]", rest)]
        for part in sorted({p for p in parts if len(p) >= 4 and not p.replace(".", "").isdigit()},
                           key=len, reverse=True):
            if part not in ("http", "https", "localhost"):
                text = text.replace(part, "***")
    return text


# ---- delivery -----------------------------------------------------------------------------------
class Webhook:
    """POST the body as JSON; any non-2xx answer or network error raises."""

    def __init__(self, url: str):
        self.name = redact(url)
        self.headers = {"Content-Type": "application/json", "User-Agent": "cardiacseg-train"}
        p = urllib.parse.urlsplit(url)
        if p.username is not None:  # urllib does not take user:password@ from the URL: Basic auth instead
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            self.headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
            p = p._replace(netloc=p.netloc.rpartition("@")[2])
        self.url = urllib.parse.urlunsplit(p)

    def send(self, msg: dict, timeout: float) -> None:
        import urllib.request  # only when a webhook is configured: the daemon stays small otherwise

        req = urllib.request.Request(self.url, data=json.dumps(msg).encode(), method="POST", headers=self.headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()


def _drop(_record) -> bool:
    return False


def _silence_apprise() -> None:
    """Apprise logs through `logging` and quotes URLs (tokens) in its messages: drop every record at the
    logger itself (a filter there runs before any handler, whoever attached it). Our own log says what
    failed, with the URL redacted."""
    alog = logging.getLogger("apprise")
    if _drop not in alog.filters:
        alog.addFilter(_drop)
        alog.propagate = False


class AppriseTarget:
    """All Apprise URLs as one target (Apprise fans out itself). Needs the `notify` extra."""

    def __init__(self, urls: list[str]):
        import apprise  # optional extra: ImportError is handled by the caller
        _silence_apprise()
        self.ap = apprise.Apprise()
        self.rejected = [redact(u) for u in urls if not self.ap.add(u)]
        self.name = "apprise(" + ", ".join(redact(u) for u in urls) + ")"

    def send(self, msg: dict, timeout: float) -> None:
        if not self.ap.notify(title=msg["title"], body=msg["message"]):
            raise OSError("Apprise reported a failed delivery")


class Notifier:
    """A bounded queue and one delivery thread; publish() never blocks and never raises."""

    def __init__(self, targets: list, cfg_notify, log, secrets: list[str] = (), clock=time.monotonic):
        self.targets, self.n, self.log, self.secrets, self.clock = targets, cfg_notify, log, list(secrets), clock
        self.events = frozenset(cfg_notify.events)
        self.q: queue.Queue = queue.Queue()  # bounded by publish() (the only producer): the sentinel always fits
        self.sent_times: deque[float] = deque()
        self.dropped_full = self.dropped_rate = self.delivered = self.failed = 0
        self.failing: dict[str, int] = {}  # target name -> messages lost since it started failing
        self._seen_start = False
        self._limited_logged = self._full_logged = False
        self.pending = 0  # queued or being delivered (under _lock)
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cardiacseg-notify", daemon=True)
        self.thread.start()

    # -- loop thread --
    def publish(self, item, snap: dict | None) -> None:
        notice = notice_for(item)
        kind, fields = notice if notice else (None, {})
        if kind == "started":
            kind, self._seen_start = (None if self._seen_start else kind), True
        elif kind == "epoch" and not (isinstance(fields.get("epoch"), int)
                                      and fields["epoch"] % self.n.epoch_every == 0):
            kind = None
        if kind is None or kind not in self.events or self._deadline is not None:
            return
        now = self.clock()
        while self.sent_times and self.sent_times[0] <= now - 3600:
            self.sent_times.popleft()
        if kind not in FINAL and len(self.sent_times) >= self.n.max_per_hour:
            self.dropped_rate += 1
            if not self._limited_logged:  # once per limited stretch
                self._limited_logged = True
                self.log.warning("notify_rate_limited", max_per_hour=self.n.max_per_hour, kind=kind)
            return
        self._limited_logged = False
        if self.q.qsize() >= QUEUE_MAX:
            self.dropped_full += 1
            if not self._full_logged:
                self._full_logged = True
                self.log.warning("notify_queue_full", dropped=self.dropped_full, kind=kind)
            return
        self._full_logged = False
        self.sent_times.append(now)
        with self._lock:
            self.pending += 1
        self.q.put_nowait(body(kind, fields, snap))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued until the deadline; what is left is counted and logged once."""
        if self._deadline is None:
            self._deadline = self.clock() + timeout
            self._wake.set()  # cut a backoff wait short: from now on, retries only until the deadline
            self.q.put_nowait(_STOP)
        self.thread.join(max(0.0, self._deadline - self.clock()))
        if self.pending:
            self.log.warning("notify_unsent", messages=self.pending, timeout_s=timeout)

    # -- worker thread --
    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is _STOP:
                return
            for t in self.targets:
                try:
                    self._deliver(t, msg)
                except Exception:  # pragma: no cover - a logging failure must not end deliveries
                    pass
            with self._lock:
                self.pending -= 1

    def _deliver(self, t, msg: dict) -> None:
        delay, err = self.n.backoff_seconds, None
        for i in range(self.n.retries + 1):
            rem = None if self._deadline is None else self._deadline - self.clock()
            if rem is not None and rem <= 0:
                break
            try:
                t.send(msg, self.n.timeout_seconds if rem is None else max(0.1, min(rem, self.n.timeout_seconds)))
            except Exception as e:  # any failure of an optional integration is a failed delivery, never a crash
                err = e
            else:
                self.delivered += 1
                lost = self.failing.pop(t.name, None)
                if lost is not None:
                    self.log.info("notify_recovered", target=t.name, lost=lost)
                return
            if i < self.n.retries:
                self._wake.wait(delay)  # set by close(): retry at once until the deadline
                delay *= 2
        self.failed += 1
        if t.name not in self.failing:
            self.failing[t.name] = 0
            self.log.warning("notify_failed", target=t.name, kind=msg.get("event"), tries=i + 1,
                             error=_scrub(f"{type(err).__name__}: {err}" if err else "deadline", self.secrets))
        self.failing[t.name] += 1


def build(cfg, log, env=None) -> Notifier | None:
    """The Notifier for cfg.notify, or None when nothing is configured. Problems are logged, never raised."""
    urls, hooks, problems = load_urls(cfg, env)
    for p in problems:
        log.error("notify_config_problem", problem=p)
    targets: list = [Webhook(h) for h in hooks]
    if urls:
        try:
            t = AppriseTarget(urls)
        except ImportError:
            log.error("notify_apprise_missing", urls=len(urls),
                      fix="pip install 'cardiacseg-train[notify]'")
        else:
            for r in t.rejected:
                log.error("notify_url_rejected", url=r)
            targets.append(t)
    if not targets:
        return None
    log.info("notify_enabled", targets=[t.name for t in targets], events=list(cfg.notify.events))
    return Notifier(targets, cfg.notify, log, secrets=urls + hooks)


def check_findings(cfg, env=None) -> list[tuple[str, str]]:
    """For `check`: ("fatal" | "warning" | "ok", text) about [notify]; never prints a URL's secrets."""
    urls, hooks, problems = load_urls(cfg, env)
    out = [("fatal", p) for p in problems]
    if urls:
        try:
            import apprise
        except ImportError:
            out.append(("fatal", f"notify: {len(urls)} Apprise URL(s) set but the apprise package is missing: "
                                 "pip install 'cardiacseg-train[notify]'"))
        else:
            _silence_apprise()
            ap = apprise.Apprise()
            out += [("fatal", f"notify: {redact(u)} is not a URL Apprise understands") for u in urls
                    if not ap.add(u)]
    if (urls or hooks) and not any(level == "fatal" for level, _ in out):
        what = [f"{len(urls)} Apprise URL(s)"] if urls else []
        what += [f"webhook {redact(h)}" for h in hooks]
        out.append(("ok", f"notify: {', '.join(what)}; events {', '.join(cfg.notify.events)}"))
    return out
