"""Load and validate config.toml.

How it works: the file is parsed with tomllib (tomli before 3.11) and checked against SCHEMA, a
declarative table of sections -> keys -> Field(type, default, check, doc). Every problem is collected
(unknown section or key, wrong type, impossible value) and raised together as one ConfigError, whose
message names the file, the dotted key and what was expected. The CLI prints it without a traceback
and exits with EXIT_CONFIG (2). The result is a frozen, plain `Config` object: the rest of the
supervisor never touches raw TOML.

Relative paths are resolved against the directory of the config file, so a config copied together
with its data keeps working; `~` is expanded.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(Exception):
    """One or more problems with the configuration; str() is the full user-facing message."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(
            f"configuration error in {self.path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class Field:
    type: type | tuple[type, ...]
    default: Any
    check: Callable[[Any], str | None] | None = None  # returns an expectation message when invalid
    doc: str = ""


def _positive(v):
    return None if v > 0 else "a number > 0"


def _non_negative(v):
    return None if v >= 0 else "a number >= 0"


def _unit_interval(v):
    return None if 0 < v <= 1 else "a number in (0, 1]"


def _unit_interval_or_zero(v):
    return None if 0 <= v <= 1 else "a number in [0, 1]"


def _argv(v):
    if not v or not all(isinstance(x, str) and x for x in v):
        return "a non-empty list of non-empty strings (an argv, not a shell string)"
    return None


def _str_list(v):
    return None if all(isinstance(x, str) for x in v) else "a list of strings"


def _fold(v):
    if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return 'an integer >= 0 or "all"'


def _device(v):
    return None if v in ("cuda", "cpu", "mps") else 'one of "cuda", "cpu", "mps"'


def _level(v):
    return None if v.lower() in ("debug", "info", "warning", "error") else (
        'one of "debug", "info", "warning", "error"')


def _nonempty(v):
    return None if v.strip() else "a non-empty string"


_NONE = None  # a key whose default is "unset"; TOML has no null, so it is simply left out

SCHEMA: dict[str, dict[str, Field]] = {
    "training": {
        "command": Field(list, ["cardiacseg-train-nnunet"], _argv,
                         "argv prefix of the training program"),
        "dataset": Field((str, int), _NONE, None, "dataset name or id, e.g. Dataset001_CardiacSeg"),
        "configuration": Field(str, "3d_fullres", _nonempty, "nnU-Net configuration"),
        "fold": Field((int, str), 0, _fold, "fold 0-4 or \"all\""),
        "trainer": Field(str, "nnUNetTrainer", _nonempty, "trainer class (-tr)"),
        "plans": Field(str, "nnUNetPlans", _nonempty, "plans identifier (-p)"),
        "device": Field(str, "cuda", _device, "-device"),
        "num_gpus": Field(int, 1, lambda v: None if v >= 1 else "an integer >= 1", "-num_gpus"),
        "extra_args": Field(list, [], _str_list, "appended after the generated arguments"),
        "expected_epochs": Field(int, 1000, _positive, "the trainer's num_epochs (for ETA only)"),
    },
    "paths": {
        "raw": Field(str, _NONE, None, "nnUNet_raw"),
        "preprocessed": Field(str, _NONE, None, "nnUNet_preprocessed"),
        "results": Field(str, _NONE, None, "nnUNet_results"),
        "state_dir": Field(str, _NONE, None, "supervisor state, per-attempt logs"),
    },
    "restart": {
        "backoff_seconds": Field((int, float), 30, _non_negative, "first restart delay"),
        "backoff_max_seconds": Field((int, float), 600, _non_negative, "delay cap"),
        "max_restarts": Field(int, 10, _non_negative, "restarts allowed within the window"),
        "window_minutes": Field((int, float), 360, _positive, "intensity window"),
    },
    "target": {
        "ema_dice": Field((int, float), _NONE, _unit_interval, "EMA pseudo Dice to stop at"),
        "min_class_dice": Field((int, float), _NONE, _unit_interval_or_zero,
                                "every foreground class must reach this too"),
        "max_nonfinite_epochs": Field(int, 3, _non_negative,
                                      "stop as diverged after N non-finite epochs in a row (0: off)"),
        "patience_epochs": Field(int, 0, _non_negative,
                                 "stop as plateau after N epochs without a new best EMA (0: off)"),
    },
    "hang": {
        "enabled": Field(bool, True, None, "stop and restart a trainer that makes no progress"),
        "timeout_minutes": Field((int, float), 0, _non_negative,
                                 "no-progress limit; 0 derives it: 3 x the median epoch time"),
        "min_timeout_minutes": Field((int, float), 20, _positive, "floor of the derived limit"),
        "first_epoch_minutes": Field((int, float), 90, _positive,
                                     "allowance for start-up and the first epoch of an attempt"),
        "idle_cpu_percent": Field((int, float), 10, _non_negative,
                                  "the process tree counts as idle below this CPU use (of one core)"),
    },
    "stop": {
        "timeout_seconds": Field((int, float), 120, _positive, "SIGINT -> SIGKILL escalation"),
        "checkpoint_wait_seconds": Field((int, float), 300, _non_negative,
                                         "longest wait for a checkpoint write before SIGINT"),
    },
    "oom": {
        "enabled": Field(bool, True, None, "step the batch size down after a CUDA OOM"),
        "min_batch_size": Field(int, 1, lambda v: None if v >= 1 else "an integer >= 1",
                                "never below this"),
        "strategy": Field(str, "subtract", lambda v: None if v in ("subtract", "multiply") else
                          'one of "subtract", "multiply"', "how to step down"),
        "subtract": Field(int, 1, lambda v: None if v >= 1 else "an integer >= 1",
                          "strategy = subtract: batch size - N"),
        "factor": Field((int, float), 0.5, lambda v: None if 0 < v < 1 else "a number in (0, 1)",
                        "strategy = multiply: floor(batch size * factor)"),
        "gpu_release_timeout_seconds": Field((int, float), 120, _non_negative,
                                             "wait for the GPU memory of the last attempt to be freed"),
    },
    "thermal": {
        "enabled": Field(bool, _NONE, None, "default: true when training.device is cuda"),
        "source": Field(str, "nvml", lambda v: None if v in ("nvml", "command") else 'one of "nvml", "command"',
                        "where temperatures come from"),
        "command": Field(list, [], _str_list, "source = command: argv printing '<index> <celsius>' lines"),
        "command_timeout_seconds": Field((int, float), 5, _positive, "longest a sensor command may run"),
        "poll_seconds": Field((int, float), 2, _positive, "how often temperatures are read"),
        "pause_celsius": Field((int, float), 86, _positive, "SIGSTOP the training above this"),
        "resume_celsius": Field((int, float), 78, _positive, "SIGCONT once every GPU is at or below this"),
        "stop_celsius": Field((int, float), 91, _positive, "graceful stop at or above this"),
        "max_pause_minutes": Field((int, float), 15, _positive, "a longer pause becomes a graceful stop"),
        "max_failed_reads": Field(int, 5, lambda v: None if v >= 1 else "an integer >= 1",
                                  "polls in a row without readings before a graceful stop"),
        "gpus": Field(list, [], lambda v: None if all(isinstance(x, (int, str)) and not isinstance(x, bool)
                                                      for x in v) else "a list of GPU indices",
                      "GPUs to watch; default: those the training uses"),
    },
    "checkpoint": {
        "every_epochs": Field(int, 1, lambda v: None if v >= 1 else "an integer >= 1",
                              "checkpoint_latest.pth every N epochs (default launcher only)"),
        "verify": Field(bool, True, None, "check the checkpoint --c will load before each start"),
        "allow_fresh_start": Field(bool, False, None,
                                   "start at epoch 0 when every checkpoint is unreadable"),
    },
    "logging": {
        "level": Field(str, "info", _level, "log level"),
    },
}
# [environment] is free-form: NAME = "value", passed verbatim to the trainer.
FREE_FORM_SECTIONS = {"environment"}

# Config field -> the config.toml key it comes from: one table for parse() and for reload's messages.
FIELD_KEYS = {
    "command": "training.command", "dataset": "training.dataset", "configuration": "training.configuration",
    "fold": "training.fold", "trainer": "training.trainer", "plans": "training.plans",
    "device": "training.device", "num_gpus": "training.num_gpus", "extra_args": "training.extra_args",
    "expected_epochs": "training.expected_epochs", "raw": "paths.raw", "preprocessed": "paths.preprocessed",
    "results": "paths.results", "state_dir": "paths.state_dir", "environment": "environment",
    "backoff_seconds": "restart.backoff_seconds", "backoff_max_seconds": "restart.backoff_max_seconds",
    "max_restarts": "restart.max_restarts", "window_minutes": "restart.window_minutes",
    "ema_dice": "target.ema_dice", "min_class_dice": "target.min_class_dice",
    "max_nonfinite_epochs": "target.max_nonfinite_epochs", "patience_epochs": "target.patience_epochs",
    "hang_enabled": "hang.enabled", "hang_timeout_minutes": "hang.timeout_minutes",
    "hang_min_timeout_minutes": "hang.min_timeout_minutes", "hang_first_epoch_minutes": "hang.first_epoch_minutes",
    "hang_idle_cpu_percent": "hang.idle_cpu_percent",
    "timeout_seconds": "stop.timeout_seconds", "checkpoint_wait_seconds": "stop.checkpoint_wait_seconds",
    "oom_enabled": "oom.enabled", "oom_min_batch_size": "oom.min_batch_size", "oom_strategy": "oom.strategy",
    "oom_subtract": "oom.subtract", "oom_factor": "oom.factor",
    "oom_gpu_release_timeout": "oom.gpu_release_timeout_seconds",
    "thermal_enabled": "thermal.enabled", "thermal_source": "thermal.source", "thermal_command": "thermal.command",
    "thermal_command_timeout": "thermal.command_timeout_seconds", "thermal_poll": "thermal.poll_seconds",
    "thermal_pause": "thermal.pause_celsius", "thermal_resume": "thermal.resume_celsius",
    "thermal_stop": "thermal.stop_celsius", "thermal_max_pause_minutes": "thermal.max_pause_minutes",
    "thermal_max_failed_reads": "thermal.max_failed_reads", "thermal_gpus": "thermal.gpus",
    "checkpoint_every": "checkpoint.every_epochs", "checkpoint_verify": "checkpoint.verify",
    "allow_fresh_start": "checkpoint.allow_fresh_start", "level": "logging.level",
}


def _field(dotted: str) -> Field:
    section, key = dotted.split(".")
    return SCHEMA[section][key]


@dataclass(frozen=True)
class Config:
    """The validated configuration. Defaults live in SCHEMA only; parse() sets every field."""

    path: Path
    # [training]
    command: tuple[str, ...]
    dataset: str
    configuration: str
    fold: int | str
    trainer: str
    plans: str
    device: str
    num_gpus: int
    extra_args: tuple[str, ...]
    expected_epochs: int
    # [paths]
    raw: Path | None
    preprocessed: Path
    results: Path
    state_dir: Path
    # [environment]
    environment: dict[str, str]
    # [restart]
    backoff_seconds: float
    backoff_max_seconds: float
    max_restarts: int
    window_minutes: float
    # [target]
    ema_dice: float | None
    min_class_dice: float | None
    max_nonfinite_epochs: int
    patience_epochs: int
    # [hang]
    hang_enabled: bool
    hang_timeout_minutes: float
    hang_min_timeout_minutes: float
    hang_first_epoch_minutes: float
    hang_idle_cpu_percent: float
    # [stop]
    timeout_seconds: float
    checkpoint_wait_seconds: float
    # [oom]
    oom_enabled: bool
    oom_min_batch_size: int
    oom_strategy: str
    oom_subtract: int
    oom_factor: float
    oom_gpu_release_timeout: float
    # [thermal]
    thermal_enabled: bool
    thermal_source: str
    thermal_command: tuple[str, ...]
    thermal_command_timeout: float
    thermal_poll: float
    thermal_pause: float
    thermal_resume: float
    thermal_stop: float
    thermal_max_pause_minutes: float
    thermal_max_failed_reads: int
    thermal_gpus: tuple[str, ...]
    # [checkpoint]
    checkpoint_every: int
    checkpoint_verify: bool
    allow_fresh_start: bool
    # [logging]
    level: str

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "true/false"}
    ts = t if isinstance(t, tuple) else (t,)
    if set(ts) == {int, float}:
        return "a number"
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _type_ok(value, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in ts:  # TOML true is not the integer 1
        return False
    return isinstance(value, ts)


def parse(raw: dict, path: Path, env: dict[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    values: dict[str, Any] = {}
    for section, body in raw.items():
        if section in FREE_FORM_SECTIONS:
            if not isinstance(body, dict):
                problems.append(f"[{section}]: expected a table of NAME = \"value\"")
                continue
            for k, v in body.items():
                if not isinstance(v, str):
                    problems.append(f"environment.{k}: expected a string, got {v!r}")
            continue
        if section not in SCHEMA:
            known = ", ".join(f"[{s}]" for s in [*SCHEMA, *FREE_FORM_SECTIONS])
            problems.append(f"[{section}]: unknown section (known: {known})")
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: expected a table [{section}]")
            continue
        for key, value in body.items():
            fld = SCHEMA[section].get(key)
            if fld is None:
                problems.append(f"{section}.{key}: unknown key (known: {', '.join(SCHEMA[section])})")
                continue
            if not _type_ok(value, fld.type):
                problems.append(f"{section}.{key}: expected {_type_name(fld.type)}, got {value!r}")
                continue
            if fld.check and (why := fld.check(value)):
                problems.append(f"{section}.{key}: expected {why}, got {value!r}")
                continue
            values[f"{section}.{key}"] = value

    def get(dotted):
        s, k = dotted.split(".")
        return values.get(dotted, SCHEMA[s][k].default)

    base = path.parent

    def resolve(p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (base / q)

    if get("training.dataset") is None:
        problems.append("training.dataset: required, e.g. dataset = \"Dataset001_CardiacSeg\"")
    paths = {}
    for key, envname in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"),
                         ("results", "nnUNet_results")):
        p = get(f"paths.{key}") or env.get(envname)
        if p is None and key != "raw":
            problems.append(f"paths.{key}: required (or set {envname} in the environment)")
        paths[key] = resolve(p)
    state_dir = get("paths.state_dir") or env.get("STATE_DIRECTORY", "").split(":")[0] or "state"
    bo, bmax = get("restart.backoff_seconds"), get("restart.backoff_max_seconds")
    if bmax < bo:
        problems.append(f"restart.backoff_max_seconds: expected >= restart.backoff_seconds ({bo}), got {bmax}")
    tp, tr, ts = get("thermal.pause_celsius"), get("thermal.resume_celsius"), get("thermal.stop_celsius")
    if tr >= tp:
        problems.append(f"thermal.resume_celsius: expected lower than thermal.pause_celsius ({tp}), got {tr}")
    if tp >= ts:
        problems.append(f"thermal.pause_celsius: expected lower than thermal.stop_celsius ({ts}), got {tp}")
    if get("thermal.source") == "command" and not get("thermal.command"):
        problems.append('thermal.command: required when thermal.source = "command" (an argv list)')
    thermal_on = get("thermal.enabled")
    if thermal_on is None:
        thermal_on = get("training.device") == "cuda"
    if problems:
        raise ConfigError(path, problems)
    fields = {}
    for name, key in FIELD_KEYS.items():
        if key == "environment":
            fields[name] = dict(raw.get("environment", {}))
            continue
        v = get(key)
        if isinstance(v, list):  # frozen Config: tuples; GPU names compare as strings
            v = tuple(str(x) for x in v) if name == "thermal_gpus" else tuple(v)
        elif v is not None and _field(key).type == (int, float):
            v = float(v)
        fields[name] = v
    fields.update(dataset=str(fields["dataset"]), raw=paths["raw"], preprocessed=paths["preprocessed"],
                  results=paths["results"], state_dir=resolve(state_dir), thermal_enabled=thermal_on,
                  level=fields["level"].lower())
    return Config(path=path, **fields)


def load(path: str | Path, env: dict[str, str] | None = None) -> Config:
    """Read and validate `path`. Raises ConfigError (never OSError/TOMLDecodeError)."""
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, ["not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse(raw, path, env)
