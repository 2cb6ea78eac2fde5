"""sd_notify on the standard library: READY, STATUS, WATCHDOG, STOPPING, EXTEND_TIMEOUT_USEC, RELOADING.

How it works: systemd passes $NOTIFY_SOCKET, a filesystem path or an abstract socket ('@name', sent
as '\\0name'). Each notification is one datagram of "KEY=value" lines on an AF_UNIX SOCK_DGRAM socket.
Without NOTIFY_SOCKET every call is a silent no-op, and a send that fails (socket gone, buffer full) is
dropped: an optional integration must never crash the loop. The watchdog interval is half of
$WATCHDOG_USEC, and only when $WATCHDOG_PID is unset or names this process (sd_watchdog_enabled's rule).
STATUS= is sent only when the text changes, so calling `status()` every loop turn costs nothing.
"""
from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None, clock=time.monotonic):
        env = os.environ if env is None else env
        self.clock = clock
        addr = env.get("NOTIFY_SOCKET") or None
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]
        self.addr = addr
        self.sock = None
        if addr:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError:
                self.addr = None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        try:
            if self.addr and usec and int(usec) > 0 and (not pid or int(pid) == os.getpid()):
                self.watchdog_interval = int(usec) / 1e6 / 2
        except ValueError:
            pass
        self.next_watchdog = 0.0
        self.last_status: str | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.addr is not None

    def send(self, **fields) -> bool:
        if self.sock is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self.sock.sendto(msg, self.addr)
            return True
        except OSError:
            self.failures += 1
            return False

    def ready(self, status: str | None = None) -> None:
        fields = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
            self.last_status = status
        self.send(**fields)

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send(STATUS=text)

    def watchdog(self) -> None:
        if self.watchdog_interval is None:
            return
        now = self.clock()
        if now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval
            self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> None:
        fields = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        self.send(**fields)

    def extend_timeout(self, seconds: float) -> None:
        self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def reloading(self) -> None:
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
