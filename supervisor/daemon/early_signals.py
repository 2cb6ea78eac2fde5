"""Signals that arrive while `cardiacseg-train run` is still starting, before its loop's own handlers.

How it works: `python -m supervisor run` installs `record` for SIGTERM, SIGINT, SIGHUP and SIGUSR1 as its
very first statement (supervisor/__main__.py), before the imports and the configuration, which take a few
hundred milliseconds. A signal then is kept here instead of ending the process by its default action (a
systemd reload right after start, a stop during start-up, SLURM's time-limit SIGUSR1 to a requeued job at
its launch), and the daemon's or the queue master's loop `take()`s them as the first signals it handles.
Only `run` does this: the other commands keep the default actions (Ctrl-C ends them at once).
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
_early: list[int] = []


def record(signum, _frame) -> None:
    _early.append(signum)


def install() -> None:
    for s in SIGNALS:
        signal.signal(s, record)


def take() -> list[int]:
    """The signals recorded so far, oldest first; the caller has installed its own handlers already."""
    out = list(_early)
    del _early[:len(out)]
    return out
