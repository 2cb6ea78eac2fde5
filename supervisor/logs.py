"""Logging: structlog, one event per line, `event key=value ...`, readable by a person tailing it.

How it works: `setup(level)` configures structlog once for the process with a filtering bound logger
(so a reload can change the level by calling setup again) writing to stderr. Outside systemd each line
starts with a local timestamp and the level. Trainer output is logged with the trainer's line as the
event and `src=trainer attempt=N` fields, so both streams read as one story.
"""
from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup(level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0, sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "supervisor"):
    return structlog.get_logger(name)
