"""The declaration of every config.toml key: one frozen dataclass per section, one `key(...)` per key.

How it works: `key(default, check, doc, types=..., reload=...)` is a dataclass field whose metadata holds
the key's schema: the TOML types accepted, the bound (a function returning what was expected, or None),
the one-line doc, and when a reload applies it (LIVE, NEXT_ATTEMPT, RESTART). config.py parses a file
against these declarations; reload.py, `check`, the README's table (config.markdown_table, checked by a
test) and the example config.toml (checked by a test against `iter_keys()`) all come from them. Bounds
are finite: inf/nan cannot be stored in state.json and would crash later.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import names
from supervisor.config.folds import parse_folds
from typing import Any, Mapping

from supervisor.config.validators import (  # noqa: F401  (LIVE & co: re-exported for loader.py)
    LIVE, NEXT_ATTEMPT, RESTART, REQUIRED, UNSET, NUMBER, LIMIT, key, _finite, positive, non_negative, at_least_one,
    unit_interval, unit_interval_or_zero, celsius, one_of, nonempty, str_list, argv, fold, gpu_list,
    env_name_problem, http_url, loopback_listen)

# ---- the sections -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Training:
    command: tuple = key(("cardiacseg-train-nnunet",), argv, "argv prefix of the trainer (a list, never a "
                         "shell string); relative paths are relative to this file", types=list,
                         reload=NEXT_ATTEMPT)
    dataset: str = key(REQUIRED, names.dataset, "`Dataset001_CardiacSeg` or its id",
                       types=(str, int), reload=RESTART, default_doc="required")
    configuration: str = key("3d_fullres", names.name, "nnU-Net configuration", types=str, reload=RESTART)
    fold: Any = key(0, fold, '0-4 or `"all"`', types=(int, str), reload=RESTART)
    trainer: str = key("nnUNetTrainer", names.trainer, "`-tr`", types=str, reload=RESTART)
    plans: str = key("nnUNetPlans", names.name, "`-p`", types=str, reload=RESTART)
    device: str = key("cuda", one_of("cuda", "cpu", "mps"), "`cuda`, `cpu` or `mps`", types=str,
                      reload=NEXT_ATTEMPT)
    compile: str = key("auto", one_of("auto", "on", "off"), "torch.compile in the trainer: `auto` (nnU-Net's "
                       "default; turned off for this job after a compile failure, shown in status), `on` "
                       "(nnUNet_compile=t, never turned off), `off` (nnUNet_compile=f)", types=str,
                       reload=NEXT_ATTEMPT)
    num_gpus: int = key(1, at_least_one, "> 1 adds `-num_gpus N`", types=int, reload=NEXT_ATTEMPT)
    extra_args: tuple = key((), str_list, "appended to the generated arguments", types=list,
                            reload=NEXT_ATTEMPT)
    expected_epochs: int = key(1000, at_least_one, "the trainer's num_epochs, for `status`'s ETA only",
                               types=int)


@dataclass(frozen=True)
class Paths:
    raw: Path | None = key(UNSET, nonempty, "nnUNet_raw (exported to the trainer)", types=str,
                           reload=RESTART, default_doc="`$nnUNet_raw`")
    preprocessed: Path | None = key(REQUIRED, nonempty, "nnUNet_preprocessed", types=str, reload=RESTART,
                                    default_doc="`$nnUNet_preprocessed`")
    results: Path | None = key(REQUIRED, nonempty, "nnUNet_results", types=str, reload=RESTART,
                               default_doc="`$nnUNet_results`")
    state_dir: Path | None = key(UNSET, nonempty, "state.json, lock, per-attempt logs; one job per "
                                 "state_dir. Inside a SLURM job the default is per job and array task, "
                                 "so a requeued job (same id) finds its state; `status` finds it too",
                                 types=str, reload=RESTART,
                                 default_doc="`$STATE_DIRECTORY`, else in a SLURM job "
                                 "`./state/slurm-<ARRAY_JOB_ID or JOB_ID>[_<TASK_ID>]`, else `./state`")


@dataclass(frozen=True)
class Restart:
    backoff_seconds: float = key(30, non_negative, "first restart delay, doubles per consecutive failure")
    backoff_max_seconds: float = key(600, non_negative, "delay cap")
    max_restarts: int = key(10, non_negative, "restarts allowed within the window ...", types=int)
    window_minutes: float = key(360, positive, "... else give up (exit 3)")
    disk_full_wait_minutes: float = key(360, non_negative, "trainer died of a full disk: wait this long "
                                        "for free space, then give up (exit 3); not counted as restarts")


@dataclass(frozen=True)
class Target:
    ema_dice: float | None = key(UNSET, unit_interval, "stop at this EMA pseudo Dice, in (0, 1]; unset: "
                                 "train to the end", default_doc="unset")
    min_class_dice: float | None = key(UNSET, unit_interval_or_zero, "every foreground class must reach "
                                       "it too", default_doc="unset")
    max_nonfinite_epochs: int = key(3, non_negative, "non-finite loss/Dice epochs in a row -> `diverged` "
                                    "(0: off)", types=int)
    patience_epochs: int = key(0, non_negative, "epochs without a new best EMA -> `plateau` stop (0: off)",
                               types=int)


@dataclass(frozen=True)
class Hang:
    enabled: bool = key(True, None, "stop and restart a trainer that makes no progress and is idle",
                        types=bool)
    timeout_minutes: float = key(0, non_negative, "no-epoch limit; 0: 3 x median epoch time, at least "
                                 "`min_timeout_minutes`")
    min_timeout_minutes: float = key(20, positive, "floor of the derived limit")
    first_epoch_minutes: float = key(90, positive, "allowance for start-up and the first epoch of an "
                                     "attempt")
    idle_cpu_percent: float = key(10, non_negative, "below this CPU use (of one core) the process tree "
                                  "is idle")
    final_validation_minutes: float = key(60, positive, "after \"Training done.\": idle this long is a hung final "
                                          "validation, rerun with --val and half the export processes")


@dataclass(frozen=True)
class Stop:
    timeout_seconds: float = key(120, positive, "SIGINT -> SIGKILL escalation")
    checkpoint_wait_seconds: float = key(300, non_negative, "longest wait for a checkpoint write before "
                                         "a stop's SIGINT (target, plateau, operator)")


@dataclass(frozen=True)
class Oom:
    enabled: bool = key(True, None, "step the batch size down after a CUDA OOM", types=bool)
    min_batch_size: int = key(1, at_least_one, "never below; an OOM here gives up (exit 3)", types=int)
    strategy: str = key("subtract", one_of("subtract", "multiply"), "`subtract` or `multiply`", types=str)
    subtract: int = key(1, at_least_one, "strategy subtract: batch size - N", types=int)
    factor: float = key(0.5, lambda v: None if _finite(v) and 0 < v < 1 else "a number in (0, 1)",
                        "strategy multiply: floor(batch size x factor)")
    gpu_release_timeout_seconds: float = key(120, non_negative, "wait for the last attempt's GPU memory "
                                             "to be freed")


@dataclass(frozen=True)
class Thermal:
    enabled: bool | None = key(UNSET, None, "the thermal guard (NVML missing -> exit 2)", types=bool,
                               reload=RESTART, default_doc="on for `cuda`")
    source: str = key("nvml", one_of("nvml", "command"), "`nvml`, or `command`: an argv printing "
                      "`<index> <celsius>` lines", types=str, reload=RESTART)
    command: tuple = key((), str_list, "source = command: the argv", types=list, reload=RESTART)
    command_timeout_seconds: float = key(5, positive, "longest a sensor command may run")
    poll_seconds: float = key(2, positive, "how often temperatures are read")
    pause_celsius: float = key(86, celsius, "SIGSTOP the whole training process group above this")
    resume_celsius: float = key(78, celsius, "SIGCONT once every watched GPU is at or below this")
    stop_celsius: float = key(91, celsius, "graceful stop at or above this")
    stop_wait_seconds: float = key(60, non_negative, "at or above stop_celsius, longest wait for a "
                                   "checkpoint write before the stop's SIGINT")
    max_pause_minutes: float = key(15, positive, "longer pauses become a graceful stop")
    max_failed_reads: int = key(5, at_least_one, "polls without readings before a graceful stop",
                                types=int)
    gpus: tuple = key((), gpu_list, "NVML indices to watch", types=list, reload=RESTART,
                      default_doc="the training's GPUs")


@dataclass(frozen=True)
class Checkpoint:
    every_epochs: int = key(1, at_least_one, "default launcher: checkpoint_latest every N epochs",
                            types=int, reload=NEXT_ATTEMPT)
    verify: bool = key(True, None, "check the checkpoint `--c` will load before each start", types=bool)
    allow_fresh_start: bool = key(False, None, "all checkpoints unreadable: start at epoch 0 whatever that loses "
                                  "(else: see fresh_start_max_minutes)", types=bool)
    fresh_start_max_minutes: float = key(30, non_negative, "all checkpoints unreadable: start at epoch 0 when the "
                                         "training that loses took at most this long (else exit 3)")


def _str_or_int_list(v):
    return None if all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in v) else \
        "a list of integers or strings"


def _folds(v):
    """A list of folds, or one string in the command line's syntax ("0-4", "0,2,4", "all")."""
    if isinstance(v, str):
        try:
            parse_folds(v)
        except ValueError as e:
            return f"folds as a list, or a string like \"0-4\" ({e})"
        return None
    return next((fold(x) for x in v if fold(x)), None) or (
        None if len(set(map(str, v))) == len(v) else "a list without repeats")


@dataclass(frozen=True)
class Queue:
    folds: tuple = key((), _folds, "folds to train, one job each (with every configuration below): a list, or "
                       "SLURM's range syntax as a string (\"0-4\"; \"all\": every fold of splits_final.json)", types=(list, str), reload=RESTART,
                       default_doc="`training.fold` alone",
                       convert=lambda v: tuple(parse_folds(v)) if isinstance(v, str) else tuple(v))
    configurations: tuple = key((), lambda v: names.name_list(v) or (None if len(set(v)) == len(v) else
                                "a list without repeats"),
                                "configurations to train (a cascade waits for every 3d_lowres fold of the queue)", types=list,
                                reload=RESTART, default_doc="`training.configuration` alone")
    gpus: tuple = key((), _str_or_int_list, "one concurrent job per entry, each a CUDA_VISIBLE_DEVICES value",
                      types=list, reload=RESTART, default_doc="one slot, the environment's devices")
    on_give_up: str = key("continue", one_of("continue", "stop"), "a job that gives up: go on with the next "
                          "job, or stop the queue (exit 3 either way at the end)", types=str, reload=RESTART)
    find_best_configuration: bool = key(False, None, "run nnUNetv2_find_best_configuration once every job is "
                                        "done", types=bool, reload=RESTART)


@dataclass(frozen=True)
class Tune:
    workers: bool = key(True, None, "when `status` finds data loading the limit and cores and RAM are free: "
                        "restart once at a safe point with the suggested nnUNet_n_proc_DA, keep it if epochs "
                        "get faster, else go back", types=bool)
    measure_epochs: int = key(3, at_least_one, "epochs measured after the change (the first epoch of an attempt "
                              "is left out: start-up, compile)", types=int)
    min_gain: float = key(0.05, unit_interval_or_zero, "kept only when the median epoch is at least this fraction "
                          "shorter")
    batch_size_fit: bool = key(False, None, "before the first attempt on a GPU (again on another GPU): probe the "
                               "training step at increasing batch sizes in a child process and write the largest "
                               "that keeps fit_headroom free to the plans (backed up, like the OOM step-down)",
                               types=bool)
    fit_headroom: float = key(0.10, lambda v: None if _finite(v) and 0 <= v < 1 else "a number in [0, 1)",
                              "fraction of the GPU's memory kept free: a batch size fits when its peak "
                              "(torch.cuda.max_memory_allocated) is at most total x (1 - fit_headroom)")
    fit_max_seconds: float = key(300, positive, "time bound of the whole fit (start-up and every probe); what it "
                                 "measured by then counts, else the plans' batch size is used")
    fit_iterations: int = key(3, at_least_one, "training iterations per batch size probed (the peak over all)",
                              types=int)


@dataclass(frozen=True)
class Slurm:
    max_requeues: int = key(20, non_negative, "inside a SLURM job: stop at a safe point on SIGUSR1/SIGTERM and "
                            "`scontrol requeue` at most this many times (SLURM_RESTART_COUNT)", types=int)


@dataclass(frozen=True)
class Logging:
    level: str = key("info", one_of("debug", "info", "warning", "error"), "`debug`, `info`, `warning`, "
                     "`error`", types=str)


NOTIFY_EVENTS = ("target_reached", "completed", "gave_up", "cuda_oom", "thermal_stop", "hang", "diverged",
                 "config_error", "bottleneck", "disk_full", "gpu_unhealthy", "compile_error", "workers_died",
                 "crash", "thermal_pause", "started", "epoch", "preempted")
NOTIFY_DEFAULT_EVENTS = NOTIFY_EVENTS[:13]


def notify_events(v):
    bad = [x for x in v if x not in NOTIFY_EVENTS]
    return None if not bad else "a list of " + ", ".join(f'"{e}"' for e in NOTIFY_EVENTS)


@dataclass(frozen=True)
class Notify:
    urls: tuple = key((), str_list, "Apprise URLs (ntfy, Slack, Matrix, mailto, Telegram, ...); needs the "
                      "`notify` extra", types=list, reload=RESTART)
    urls_file: str | None = key(UNSET, nonempty, "file with more Apprise URLs (one a line, `webhook=URL` for "
                                "the webhook); refused when others can read it", types=str, reload=RESTART,
                                default_doc="unset")
    credential: str = key("notify-urls", nonempty, "systemd `LoadCredential=` name read from "
                          "`$CREDENTIALS_DIRECTORY`, same format as urls_file", types=str, reload=RESTART)
    webhook: str | None = key(UNSET, http_url, "POST a JSON body to this URL (built in, no extra)", types=str,
                              reload=RESTART, default_doc="unset")
    events: tuple = key(NOTIFY_DEFAULT_EVENTS, notify_events, "what to send; also `crash`, `thermal_pause`, "
                        "`started`, `epoch`", types=list, reload=RESTART)
    epoch_every: int = key(10, at_least_one, "event `epoch`: every N epochs", types=int, reload=RESTART)
    timeout_seconds: float = key(10, positive, "deadline of one delivery try, all of it (connect, send, "
                                 "answer), not per read", reload=RESTART)
    retries: int = key(3, non_negative, "tries after the first, with doubling backoff", types=int,
                       reload=RESTART)
    backoff_seconds: float = key(5, non_negative, "first retry delay", reload=RESTART)
    max_per_hour: int = key(30, at_least_one, "rate limit; more are dropped and counted (final outcomes "
                            "always go out)", types=int, reload=RESTART)


@dataclass(frozen=True)
class Metrics:
    textfile: str | None = key(UNSET, nonempty, "`.prom` file for node_exporter's textfile collector, "
                               "written atomically", types=str, reload=RESTART, default_doc="unset")
    listen: str | None = key(UNSET, loopback_listen, "serve `/metrics` on this `HOST:PORT`, HOST a loopback IP "
                             "(`127.0.0.1`, `[::1]`)",
                             types=str, reload=RESTART, default_doc="off")
    plot: bool = key(True, None, "redraw `<state_dir>/progress.png` (a child process; at most once a minute, and at the end)", types=bool,
                     reload=RESTART)


@dataclass(frozen=True)
class Config:
    """The validated configuration: one attribute per section of config.toml."""

    path: Path
    training: Training
    paths: Paths
    environment: Mapping[str, str]  # [environment]: free-form NAME = "value", passed to the trainer
    restart: Restart
    target: Target
    hang: Hang
    stop: Stop
    oom: Oom
    thermal: Thermal
    checkpoint: Checkpoint
    queue: Queue
    tune: Tune
    slurm: Slurm
    logging: Logging
    notify: Notify
    metrics: Metrics

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else globals()[f.type]
                             for f in dataclasses.fields(Config) if f.name not in ("path", "environment")}
FREE_FORM_SECTIONS = ("environment",)
ENVIRONMENT_RELOAD = NEXT_ATTEMPT


def iter_keys():
    """(section, name, dataclasses.Field) for every declared key, in file order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f.name, f


def reload_kind(dotted: str) -> str:
    if dotted == "environment":
        return ENVIRONMENT_RELOAD
    section, name = dotted.split(".")
    return next(f.metadata["reload"] for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
