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

from .config import FIELD_KEYS, Config

# config field -> the key users write in config.toml
KEY_NAMES = {f: ("[environment]" if k == "environment" else k) for f, k in FIELD_KEYS.items()}
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
