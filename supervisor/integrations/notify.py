"""Notifications ([notify]): tell a person when the job needs them, without ever blocking the loop.

How it works
- notices.py: `notice_for(item)` maps what the policy decided to a notification kind and its fields: a StateChanged
  (into FAILED: gave_up / config_error / diverged / gpu_unhealthy; into DONE: completed / target_reached /
  preempted; into BACKOFF: crash / hang / cuda_oom / compile_error / workers_died, with the restart it
  scheduled; into PAUSED: thermal_pause; into COOLING: thermal_stop; into NO_SPACE: disk_full), a Diagnosed verdict (bottleneck), a Spawn that
  started the first attempt of this process (started), and every `epoch_every`-th EpochDone (epoch).
  Log event names play no part. `Notifier.publish` keeps only the kinds listed in `notify.events`.
- notices.py: `body(kind, fields, snap)` builds the JSON the webhook receives (event, message, dataset, configuration,
  fold, epoch, ema_dice, best_ema_dice, batch_size, restarts, host, time, ...). Apprise gets
  `title` and `message` of the same body.
- `Notifier.publish` runs on the loop thread and only does cheap work: map, rate limit (a sliding hour
  of `max_per_hour`; final outcomes always pass), and a non-blocking put on each target's bounded queue
  (full: dropped and counted).
- One worker thread per target (the webhook, each Apprise URL): a slow or hung target delays only its
  own queue, never the messages to the others, nor their final message before exit. Each try has a total
  deadline of `timeout_seconds` (not a per-read timeout, which a server trickling a byte at a time
  defeats), retried `retries` times with a doubling backoff. The webhook enforces the deadline inside its
  own HTTP client and leaves nothing behind (webhook.py). Apprise's plugins do their own I/O, which cannot
  be cut from outside, so an Apprise try runs in a daemon thread that the worker waits for until the
  deadline and then abandons; the next try first waits, within its own deadline, for the abandoned one to
  end, so a URL has at most one such thread however long its server hangs. A target that starts failing
  is logged once (not per try, not per message) and once more when it works again, with the count lost.
- `close(timeout)` lets every worker drain its queue (cutting backoff waits short, each try bounded by
  what is left) until one shared deadline, so the message about a give-up reaches every working target
  before the process exits; workers are daemon threads, so a hung server never keeps the process alive.
- Secrets: notify_urls.py (where URLs come from; log lines carry only `redact(url)`, errors are scrubbed).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from supervisor.integrations.notices import body, notice_for
from supervisor.integrations.notify_urls import load_urls, redact, scrub
from supervisor.integrations.webhook import DeadlineExceeded, Webhook

__all__ = ["Notifier", "Webhook", "AppriseTarget", "build", "check_findings", "load_urls", "redact"]

QUEUE_MAX = 100  # messages waiting per target
FINAL = frozenset({"gave_up", "config_error", "completed", "target_reached", "diverged", "gpu_unhealthy"})
_STOP = object()


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
    """One Apprise URL, a target of its own. Needs the `notify` extra. A try runs Apprise's blocking call in
    a daemon thread and is abandoned at its deadline (see the module docstring: why, and why it stays one
    thread per URL at most)."""

    def __init__(self, url: str):
        import apprise  # optional extra: ImportError is handled by the caller
        _silence_apprise()
        self.ap = apprise.Apprise()
        self.ok = bool(self.ap.add(url))
        self.name = f"apprise({redact(url)})"
        self._running: threading.Thread | None = None  # an abandoned try that has not ended yet

    def send(self, msg: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._running is not None:
            self._running.join(timeout)
            if self._running.is_alive():
                raise DeadlineExceeded(f"the previous try is still running after another {timeout:g} s")
            self._running = None
        out: dict = {}

        def run():
            try:
                out["ok"] = self.ap.notify(title=msg["title"], body=msg["message"])
            except Exception as e:  # a plugin's failure is a failed delivery
                out["error"] = e

        t = threading.Thread(target=run, name="cardiacseg-apprise-try", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            self._running = t
            raise DeadlineExceeded(f"no answer within {timeout:g} s (the try is abandoned)")
        if "error" in out:
            raise out["error"]
        if not out.get("ok"):
            raise OSError("Apprise reported a failed delivery")


class _Worker:
    """One target's bounded queue and delivery thread (the Notifier's part that blocks)."""

    def __init__(self, owner: "Notifier", target, index: int):
        self.o, self.t = owner, target
        self.q: queue.Queue = queue.Queue()  # bounded by offer() (the only producer): the sentinel always fits
        self.lock = threading.Lock()
        self.pending = 0  # queued or being delivered (under lock)
        self.delivered = self.failed = self.dropped = self.unsent = 0
        self.lost: int | None = None  # messages lost since the target started failing; None: working
        self._full_logged = False
        self.thread = threading.Thread(target=self._run, name=f"cardiacseg-notify-{index}", daemon=True)
        self.thread.start()

    def offer(self, msg: dict) -> bool:
        """Queue `msg` without blocking; False (dropped, counted, logged once per full stretch) when full."""
        if self.q.qsize() >= QUEUE_MAX:
            self.dropped += 1
            if not self._full_logged:
                self._full_logged = True
                self.o.log.warning("notify_queue_full", target=self.t.name, dropped=self.dropped,
                                   kind=msg.get("event"))
            return False
        self._full_logged = False
        with self.lock:
            self.pending += 1
        self.q.put_nowait(msg)
        return True

    def _run(self) -> None:
        while True:
            msg = self.q.get()
            if msg is _STOP:
                return
            tried = True
            try:
                tried = self._deliver(msg)
            except Exception:  # pragma: no cover - a logging failure must not end deliveries
                pass
            finally:
                with self.lock:  # one step, so that close() never counts a message twice or not at all
                    self.pending -= 1
                    self.unsent += not tried

    def _deliver(self, msg: dict) -> bool:
        """Try `msg` on the target; False when close()'s deadline left no time for a first try."""
        n, o, t = self.o.n, self.o, self.t
        delay, err, tries = n.backoff_seconds, None, 0
        for i in range(n.retries + 1):
            rem = None if o.deadline is None else o.deadline - o.clock()
            if rem is not None and rem <= 0:
                if not tries:  # close()'s deadline passed before its first try: unsent, not failed
                    return False
                break
            budget = n.timeout_seconds if rem is None else max(0.1, min(rem, n.timeout_seconds))
            t0, tries = time.monotonic(), i + 1
            try:
                t.send(msg, budget)
            except Exception as e:  # any failure of an optional integration is a failed delivery, never a crash
                err = e
                o.log.debug("notify_try_failed", target=t.name, kind=msg.get("event"), attempt=tries,
                            seconds=round(time.monotonic() - t0, 3), error=self._text(e))
            else:
                self.delivered += 1
                if self.lost is not None:
                    o.log.info("notify_recovered", target=t.name, lost=self.lost)
                    self.lost = None
                return True
            if i < n.retries:
                o.wake.wait(delay)  # set by close(): retry at once until the deadline
                delay *= 2
        self.failed += 1
        if self.lost is None:
            self.lost = 0
            o.log.warning("notify_failed", target=t.name, kind=msg.get("event"), tries=tries,
                          error=self._text(err) if err else "deadline")
        self.lost += 1
        return True

    def _text(self, e: BaseException) -> str:
        return scrub(f"{type(e).__name__}: {e}", self.o.secrets)


class Notifier:
    """Bounded queues and one delivery thread per target; publish() never blocks and never raises."""

    def __init__(self, targets: list, cfg_notify, log, secrets: list[str] = (), clock=time.monotonic):
        self.n, self.log, self.secrets, self.clock = cfg_notify, log, list(secrets), clock
        self.events = frozenset(cfg_notify.events)
        self.sent_times: deque[float] = deque()
        self.dropped_rate = 0
        self._seen_start = self._limited_logged = False
        self.deadline: float | None = None
        self.wake = threading.Event()
        self.workers = [_Worker(self, t, i) for i, t in enumerate(targets)]
        self.targets = targets

    dropped_full = property(lambda self: sum(w.dropped for w in self.workers))
    delivered = property(lambda self: sum(w.delivered for w in self.workers))
    failed = property(lambda self: sum(w.failed for w in self.workers))
    pending = property(lambda self: sum(w.pending for w in self.workers))

    # -- loop thread --
    def publish(self, item, snap: dict | None) -> None:
        notice = notice_for(item)
        kind, fields = notice if notice else (None, {})
        if kind == "started":
            kind, self._seen_start = (None if self._seen_start else kind), True
        elif kind == "epoch" and not (isinstance(fields.get("epoch"), int)
                                      and fields["epoch"] % self.n.epoch_every == 0):
            kind = None
        if kind is None or kind not in self.events or self.deadline is not None:
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
        msg = body(kind, fields, snap)
        if [w.offer(msg) for w in self.workers].count(True):
            self.sent_times.append(now)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued until one deadline for all targets; what is left is counted and logged once."""
        if self.deadline is None:
            self.deadline = self.clock() + timeout
            self.wake.set()  # cut backoff waits short: from now on, retries only until the deadline
            for w in self.workers:
                w.q.put_nowait(_STOP)
        for w in self.workers:
            w.thread.join(max(0.0, self.deadline - self.clock()))
        left = {}
        for w in self.workers:
            with w.lock:  # queued, being tried, or skipped at the deadline: not delivered before exit
                if w.pending + w.unsent:
                    left[w.t.name] = w.pending + w.unsent
        if left:
            self.log.warning("notify_unsent", messages=sum(left.values()), targets=sorted(left), timeout_s=timeout)


def build(cfg, log, env=None) -> Notifier | None:
    """The Notifier for cfg.notify, or None when nothing is configured. Problems are logged, never raised."""
    urls, hooks, problems = load_urls(cfg, env)
    for p in problems:
        log.error("notify_config_problem", problem=p)
    targets: list = [Webhook(h) for h in hooks]
    if urls:
        try:
            apprise_targets = [AppriseTarget(u) for u in urls]
        except ImportError:
            log.error("notify_apprise_missing", urls=len(urls),
                      fix="pip install 'cardiacseg-train[notify]'")
        else:
            for u, t in zip(urls, apprise_targets):
                if not t.ok:
                    log.error("notify_url_rejected", url=redact(u))
            targets += [t for t in apprise_targets if t.ok]
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
