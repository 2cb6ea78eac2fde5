"""What a reload (SIGHUP, `systemctl reload`) may change, and when it takes effect. Pure functions.

How it works: `plan_reload(old, new)` compares two validated Configs field by field and sorts every
changed key into one of three kinds:
- LIVE: thresholds and policies read by the decision function at every event (target, restart, stop,
  OOM policy, log level): in force at once;
- NEXT_ATTEMPT: what builds the trainer's command line and environment (command, extra_args,
  environment, device, num_gpus): in force from the next (re)start of the trainer, which is not
  disturbed now;
- SUPERVISOR_RESTART: what names the job itself (dataset, configuration, fold, trainer, plans, paths):
  changing it under a running job would point the supervisor at another results folder and state, so
  the old value stays until the supervisor is restarted (`systemctl restart`), and the reload says so.
The merged Config is the new one with the SUPERVISOR_RESTART fields taken from the old one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import Config

# config field -> the key users write in config.toml
KEY_NAMES = {
    "command": "training.command", "dataset": "training.dataset", "configuration": "training.configuration",
    "fold": "training.fold", "trainer": "training.trainer", "plans": "training.plans",
    "device": "training.device", "num_gpus": "training.num_gpus", "extra_args": "training.extra_args",
    "expected_epochs": "training.expected_epochs", "raw": "paths.raw", "preprocessed": "paths.preprocessed",
    "results": "paths.results", "state_dir": "paths.state_dir", "environment": "[environment]",
    "backoff_seconds": "restart.backoff_seconds", "backoff_max_seconds": "restart.backoff_max_seconds",
    "max_restarts": "restart.max_restarts", "window_minutes": "restart.window_minutes",
    "ema_dice": "target.ema_dice", "min_class_dice": "target.min_class_dice",
    "timeout_seconds": "stop.timeout_seconds", "checkpoint_wait_seconds": "stop.checkpoint_wait_seconds",
    "oom_enabled": "oom.enabled", "oom_min_batch_size": "oom.min_batch_size",
    "oom_strategy": "oom.strategy", "oom_subtract": "oom.subtract", "oom_factor": "oom.factor",
    "oom_gpu_release_timeout": "oom.gpu_release_timeout_seconds", "level": "logging.level",
    "checkpoint_every": "checkpoint.every_epochs", "checkpoint_verify": "checkpoint.verify",
    "allow_fresh_start": "checkpoint.allow_fresh_start",
    "thermal_enabled": "thermal.enabled", "thermal_source": "thermal.source",
    "thermal_command": "thermal.command", "thermal_command_timeout": "thermal.command_timeout_seconds",
    "thermal_poll": "thermal.poll_seconds", "thermal_pause": "thermal.pause_celsius",
    "thermal_resume": "thermal.resume_celsius", "thermal_stop": "thermal.stop_celsius",
    "thermal_max_pause_minutes": "thermal.max_pause_minutes",
    "thermal_max_failed_reads": "thermal.max_failed_reads", "thermal_gpus": "thermal.gpus",
    "max_nonfinite_epochs": "target.max_nonfinite_epochs", "patience_epochs": "target.patience_epochs",
    "hang_enabled": "hang.enabled", "hang_timeout_minutes": "hang.timeout_minutes",
    "hang_min_timeout_minutes": "hang.min_timeout_minutes",
    "hang_first_epoch_minutes": "hang.first_epoch_minutes", "hang_idle_cpu_percent": "hang.idle_cpu_percent",
}
NEXT_ATTEMPT = frozenset({"command", "extra_args", "environment", "device", "num_gpus", "checkpoint_every"})
SUPERVISOR_RESTART = frozenset({"dataset", "configuration", "fold", "trainer", "plans", "raw",
                                "preprocessed", "results", "state_dir",
                                # the sensor source is opened once at start-up; limits are live
                                "thermal_enabled", "thermal_source", "thermal_command", "thermal_gpus"})


@dataclass(frozen=True)
class ReloadPlan:
    config: Config               # what is in force after the reload
    live: tuple[str, ...]        # config.toml keys applied now
    next_attempt: tuple[str, ...]
    needs_restart: tuple[str, ...]


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    changed = [f.name for f in dataclasses.fields(Config)
               if f.name != "path" and getattr(old, f.name) != getattr(new, f.name)]
    keep = {k: getattr(old, k) for k in changed if k in SUPERVISOR_RESTART}
    return ReloadPlan(
        config=new.replace(**keep),
        live=tuple(KEY_NAMES.get(k, k) for k in changed if k not in NEXT_ATTEMPT | SUPERVISOR_RESTART),
        next_attempt=tuple(KEY_NAMES.get(k, k) for k in changed if k in NEXT_ATTEMPT),
        needs_restart=tuple(KEY_NAMES.get(k, k) for k in changed if k in SUPERVISOR_RESTART),
    )
