"""Logging: structlog, one event per line, `event key=value ...`, readable by a person tailing it.

How it works: `setup(level)` configures structlog for the process with a filtering bound logger writing
to stderr; calling it again (on reload) changes the level. Two renderings:
- console (a terminal, a file): local timestamp, level, event, key=value fields;
- journal (stderr is journald's stream, detected by $JOURNAL_STREAM matching stderr's device:inode):
  `<N>event key=value` with N the syslog priority (7 debug, 6 info, 4 warning, 3 error), no timestamp
  (journald adds it), no colour, and newlines escaped as `\\n`, so one event is one journal entry and
  `journalctl -p warning` shows exactly the warnings and errors.
Trainer output is logged with the trainer's line as the event and `src=trainer attempt=N`.
`setup(level, trainer_output=False)` (`run --quiet-trainer`) puts `drop_trainer_output` in front of the
renderer: events with src="trainer" are dropped from this stream, whatever the level (they are still in
`<state_dir>/attempts/attempt-NNNN.log`, written by the daemon, not by logging). The choice is kept
across later `setup(level)` calls (a reload) that do not pass trainer_output.
"""
from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "critical": 2, "exception": 3}


def under_journald(stream=None, env=None) -> bool:
    env = os.environ if env is None else env
    js = env.get("JOURNAL_STREAM")
    if not js:
        return False
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _fmt(v) -> str:
    s = v if isinstance(v, str) else repr(v)
    if isinstance(v, str) and (not s or any(c in s for c in " ='\"")):
        s = repr(s)
    return s


def journal_renderer(_logger, _method, ev: dict) -> str:
    level = ev.pop("level", "info")
    event = str(ev.pop("event", ""))
    fields = " ".join(f"{k}={_fmt(v)}" for k, v in ev.items())
    line = event + (" " + fields if fields else "")
    return f"<{PRIORITY.get(level, 6)}>" + line.replace("\r", "").replace("\n", "\\n")


def drop_trainer_output(_logger, _method, ev: dict) -> dict:
    """structlog processor: the trainer's forwarded lines do not reach the console."""
    if ev.get("src") == "trainer":
        raise structlog.DropEvent
    return ev


_settings = {"trainer_output": True}


def setup(level: str = "info", stream=None, journal: bool | None = None,
          trainer_output: bool | None = None) -> None:
    stream = stream or sys.stderr
    if trainer_output is not None:
        _settings["trainer_output"] = trainer_output
    if journal is None:
        journal = under_journald(stream)
    # merge_contextvars: a queue's job supervisor labels every line with its job (job=3d_fullres/1)
    first = [structlog.contextvars.merge_contextvars] + ([] if _settings["trainer_output"] else [drop_trainer_output])
    if journal:
        processors = [*first, structlog.processors.add_log_level, journal_renderer]
    else:
        processors = [
            *first,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0, sort_keys=False),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "supervisor"):
    return structlog.get_logger(name)
