"""config.toml: load a file and validate it against the declarations in schema.py.

How it works: `load(path)` parses with tomllib (tomli before 3.11), checks every section and key against
its declaration (schema.py), collects every problem (unknown section or key, wrong type, a value out of
bounds, inf/nan, NUL bytes, environment names with `=`, TOML nested too deeply), and raises one
ConfigError whose message names the file, the dotted key and what was expected. The CLI prints it without
a traceback and exits with ExitCode.CONFIG (2). The result is a frozen `Config` with one attribute per
section: `cfg.stop.timeout_seconds`. Relative paths are resolved against the directory of the config
file; `~` is expanded. `make docs` regenerates docs/configuration.md's table from it (commands/docs.py).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from supervisor.config.schema import *  # noqa: F401,F403  (the declarations are part of this module's interface)
from supervisor.config.schema import (FREE_FORM_SECTIONS, LIVE, NEXT_ATTEMPT, RESTART, SECTIONS, Config, env_name_problem,
                     iter_keys)

class ConfigError(Exception):
    """One or more problems with the configuration; str() is the full user-facing message."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(
            f"configuration error in {self.path}:\n" + "\n".join(f"  - {p}" for p in problems)
        )



def _type_name(types) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", bool: "true/false"}
    ts = types if isinstance(types, tuple) else (types,)
    if set(ts) == {int, float}:
        return "a number"
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _type_ok(value, types) -> bool:
    ts = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in ts:  # TOML true is not the integer 1
        return False
    return isinstance(value, ts)


def _check_environment(body, problems: list[str]) -> dict[str, str]:
    if not isinstance(body, dict):
        problems.append('[environment]: expected a table of NAME = "value"')
        return {}
    for k, v in body.items():
        if (why := env_name_problem(k)) is not None:
            problems.append(f"environment.{k!r}: expected {why}")
        elif not isinstance(v, str):
            problems.append(f"environment.{k}: expected a string, got {v!r}")
        elif "\0" in v:
            problems.append(f"environment.{k}: expected a string without NUL bytes")
    return {k: v for k, v in body.items() if isinstance(v, str)}


SLURM_STATE_PREFIX = "slurm-"  # state/slurm-<job>[_<task>]: made here, found again by integrations/slurm.py


def slurm_job_spec(env: Mapping[str, str]) -> str | None:
    """The job's id as SLURM's commands take it (`scontrol requeue`): ARRAYJOBID_TASKID for an array task,
    else SLURM_JOB_ID; None outside a job. Stable across requeues."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def slurm_state_dir(env: Mapping[str, str]) -> str | None:
    """Inside a SLURM job: `state/slurm-<ARRAY_JOB_ID or JOB_ID>[_<TASK_ID>]` (stable across requeues,
    one per array task); None outside. The state lies beside the config, on the shared filesystem."""
    if not env.get("SLURM_JOB_ID"):
        return None
    name = "".join(c for c in slurm_job_spec(env) if c.isalnum() or c in "_-") or "job"
    return f"state/{SLURM_STATE_PREFIX}{name}"


def parse(raw: dict, path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    given: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    environment: dict[str, str] = {}
    for section, body in raw.items():
        if section in FREE_FORM_SECTIONS:
            environment = _check_environment(body, problems)
            continue
        if section not in SECTIONS:
            known = ", ".join(f"[{s}]" for s in [*SECTIONS, *FREE_FORM_SECTIONS])
            problems.append(f"[{section}]: unknown section (known: {known})")
            continue
        if not isinstance(body, dict):
            problems.append(f"{section}: expected a table [{section}]")
            continue
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for name, value in body.items():
            f = fields.get(name)
            if f is None:
                problems.append(f"{section}.{name}: unknown key (known: {', '.join(fields)})")
                continue
            m = f.metadata
            if not _type_ok(value, m["types"]):
                problems.append(f"{section}.{name}: expected {_type_name(m['types'])}, got {value!r}")
            elif m["check"] and (why := m["check"](value)):
                problems.append(f"{section}.{name}: expected {why}, got {value!r}")
            else:
                value = m["convert"](value) if m["convert"] else value
                given[section][name] = tuple(value) if isinstance(value, list) else value
    base = path.parent

    def resolve(p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (base / q)

    tr, pa = given["training"], given["paths"]
    if "dataset" not in tr:
        problems.append('training.dataset: required, e.g. dataset = "Dataset001_CardiacSeg"')
    for name, envname in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"),
                          ("results", "nnUNet_results")):
        p = pa.get(name) or env.get(envname) or None
        if p is None and name != "raw":
            problems.append(f"paths.{name}: required (or set {envname} in the environment)")
        pa[name] = resolve(p)
    pa["state_dir"] = resolve(pa.get("state_dir") or env.get("STATE_DIRECTORY", "").split(":")[0]
                              or slurm_state_dir(env) or "state")
    sections = {}
    for section, cls in SECTIONS.items():
        try:
            sections[section] = cls(**given[section])
        except TypeError as e:  # pragma: no cover - a declaration bug, not user input
            raise AssertionError(e) from None
    rs, th = sections["restart"], sections["thermal"]
    if rs.backoff_max_seconds < rs.backoff_seconds:
        problems.append(f"restart.backoff_max_seconds: expected >= restart.backoff_seconds "
                        f"({rs.backoff_seconds}), got {rs.backoff_max_seconds}")
    if th.resume_celsius >= th.pause_celsius:
        problems.append(f"thermal.resume_celsius: expected lower than thermal.pause_celsius "
                        f"({th.pause_celsius}), got {th.resume_celsius}")
    if th.pause_celsius >= th.stop_celsius:
        problems.append(f"thermal.pause_celsius: expected lower than thermal.stop_celsius ({th.stop_celsius}), "
                        f"got {th.pause_celsius}")
    if sections["training"].compile != "auto" and "nnUNet_compile" in environment:
        problems.append(f'training.compile: "{sections["training"].compile}" and environment.nnUNet_compile '
                        "both say whether to compile: keep one (training.compile also lets the supervisor "
                        "turn it off after a compile failure)")
    if th.source == "command" and not th.command:
        problems.append('thermal.command: required when thermal.source = "command" (an argv list)')
    if problems:
        raise ConfigError(path, problems)
    t = sections["training"]
    sections["training"] = dataclasses.replace(t, dataset=str(t.dataset))
    sections["thermal"] = dataclasses.replace(
        th, enabled=(t.device == "cuda") if th.enabled is None else th.enabled,
        gpus=tuple(str(g) for g in th.gpus))
    sections["logging"] = dataclasses.replace(sections["logging"], level=sections["logging"].level.lower())
    return Config(path=path, environment=environment, **sections)


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate `path`. Raises ConfigError (never OSError/TOMLDecodeError)."""
    path = Path(path).absolute()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror}"]) from None
    if data.startswith(b"\xef\xbb\xbf"):  # what some Windows editors save: TOML parsers refuse it at "line 1"
        raise ConfigError(path, ["starts with a UTF-8 byte order mark (BOM), which TOML does not allow: save it "
                                 "as UTF-8 without BOM (e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' FILE`)"])
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, ["not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    except RecursionError:
        raise ConfigError(path, ["not valid TOML: nested too deeply"]) from None
    return parse(raw, path, env)


def _default_text(f) -> str:
    m = f.metadata
    if m["default_doc"]:
        return m["default_doc"]
    v = f.default
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f'`"{v}"`'
    if isinstance(v, tuple):
        return "`[" + ", ".join(f'"{x}"' for x in v) + "]`"
    return f"`{v}`"


def markdown_table() -> str:
    """docs/configuration.md's table, generated from the declarations (a test keeps the page equal)."""
    rows = ["| key | default | reload | meaning |", "| --- | --- | --- | --- |"]
    when = {LIVE: "at once", NEXT_ATTEMPT: "next attempt", RESTART: "restart"}
    for section, name, f in iter_keys():
        rows.append(f"| `{section}.{name}` | {_default_text(f)} | {when[f.metadata['reload']]} | "
                    f"{f.metadata['doc']} |")
    rows.append('| `[environment]` | | next attempt | `NAME = "value"` passed verbatim to the trainer |')
    return "\n".join(rows)
