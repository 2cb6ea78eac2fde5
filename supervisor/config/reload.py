"""What a reload (SIGHUP, `systemctl reload`) may change, and when it takes effect. Pure functions.

How it works: `plan_reload(old, new)` compares two validated Configs key by key and sorts every changed
key by its declaration's `reload` kind (config.py):
- LIVE: thresholds and policies read by the decision function at every event (target, restart, stop,
  OOM policy, thermal limits, log level): in force at once;
- NEXT_ATTEMPT: what builds the trainer's command line and environment (command, extra_args,
  environment, device, num_gpus): in force from the next (re)start of the trainer, which is not
  disturbed now;
- RESTART: what names the job itself (dataset, configuration, fold, trainer, plans, paths) or opens a
  sensor at start-up: changing it under a running job would point the supervisor at another results
  folder and state, so the old value stays until the supervisor is restarted, and the reload says so.
The merged Config is the new one with the RESTART keys taken from the old one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from supervisor.config.loader import LIVE, NEXT_ATTEMPT, RESTART, SECTIONS, Config, iter_keys, reload_kind


@dataclass(frozen=True)
class ReloadPlan:
    config: Config               # what is in force after the reload
    live: tuple[str, ...]        # config.toml keys applied now
    next_attempt: tuple[str, ...]
    needs_restart: tuple[str, ...]


def changed_keys(old: Config, new: Config) -> list[str]:
    out = [f"{s}.{n}" for s, n, _f in iter_keys()
           if getattr(getattr(old, s), n) != getattr(getattr(new, s), n)]
    if dict(old.environment) != dict(new.environment):
        out.append("environment")
    return out


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    changed = changed_keys(old, new)
    kinds = {k: reload_kind(k) for k in changed}
    merged = {}
    for section in SECTIONS:
        keep = {k.split(".")[1]: getattr(getattr(old, section), k.split(".")[1])
                for k in changed if k.startswith(section + ".") and kinds[k] == RESTART}
        merged[section] = dataclasses.replace(getattr(new, section), **keep)

    def named(kind):
        return tuple("[environment]" if k == "environment" else k for k in changed if kinds[k] == kind)

    return ReloadPlan(config=new.replace(**merged), live=named(LIVE), next_attempt=named(NEXT_ATTEMPT),
                      needs_restart=named(RESTART))
