"""The exit status of `cardiacseg-train run`: one declaration that everything else derives from.

The CLI's help text (`exit_code_help`), the docs' table (`exit_code_table`), the policy's Finish actions,
the queue master's reading of a job's exit, and the unit's RestartPreventExitStatus= (checked by a test)
all come from `ExitCode`.
"""
from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    def __new__(cls, value: int, meaning: str, systemd: str, prevent_restart: bool):
        obj = int.__new__(cls, value)
        obj._value_ = value
        obj.meaning, obj.systemd, obj.prevent_restart = meaning, systemd, prevent_restart
        return obj

    OK = (0, "done: target reached, training completed, or stopped on request", "no restart", False)
    INTERNAL = (1, "internal error: a bug in the supervisor (the only case with a traceback)", "restart", False)
    CONFIG = (2, "configuration error: config.toml, the plans file, a folder that cannot be written, another "
                 "trainer on the same fold, a known-bad torch/nnunetv2/numpy combination, a cascade stage "
                 "without the previous stage's predictions, or the trainer reported a missing "
                 "dataset/trainer/plans",
              "no restart", True)
    GAVE_UP = (3, "gave up: restart budget spent, CUDA OOM at the minimum batch size, training diverged, "
                  "no readable checkpoint left, or the disk stayed full", "no restart", True)
    LOCKED = (4, "another supervisor already runs on this state directory", "restart (later)", False)

    @property
    def systemd_restarts(self) -> bool:
        return not self.prevent_restart


def exit_code_table() -> str:
    """The docs' exit-code table (a test keeps docs/ equal to it)."""
    rows = ["| code | `run` means | systemd |", "| --- | --- | --- |"]
    rows += [f"| {int(c)} | {c.meaning} | {c.systemd} |" for c in ExitCode]
    return "\n".join(rows)


def process_exit(code: int) -> str:
    """A child's exit status as a person reads it: "exit 1", or "died by SIGINT" where Python's Popen says
    -2 (a shell says 130: 128 + the signal's number)."""
    if code >= 0:
        return f"exit {code}"
    try:
        return f"died by {signal.Signals(-code).name}"
    except ValueError:
        return f"died by signal {-code}"


def exit_code_help() -> str:
    """The exit codes as the CLI's --help shows them."""
    return "exit status:\n" + "\n".join(f"  {int(c)}  {c.meaning}" for c in ExitCode)
