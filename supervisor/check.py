"""`cardiacseg-train check`: a preflight that lists every problem at once.

How it works: each check appends Findings (fatal, warning or ok) instead of stopping at the first one,
so a new user fixes everything in one pass. CUDA is probed in a short-lived subprocess with the
trainer's environment (the supervisor itself never imports torch).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from . import job
from .config import Config

MIN_FREE_GB_FATAL = 1.0
MIN_FREE_GB_WARN = 10.0


@dataclass(frozen=True)
class Finding:
    level: str  # "fatal" | "warning" | "ok"
    what: str

    @property
    def fatal(self) -> bool:
        return self.level == "fatal"


def _check_dirs(cfg: Config, out: list[Finding]) -> None:
    for key, p in (("paths.preprocessed", cfg.paths.preprocessed), ("paths.results", cfg.paths.results)):
        if not p.is_dir():
            out.append(Finding("fatal", f"{key}: {p} is not a directory"))
        else:
            out.append(Finding("ok", f"{key}: {p}"))
    if cfg.paths.raw is not None and not cfg.paths.raw.is_dir():
        out.append(Finding("warning", f"paths.raw: {cfg.paths.raw} is not a directory (only needed for planning)"))
    d = cfg.paths.state_dir
    probe = d if d.exists() else d.parent
    if not os.access(probe, os.W_OK):
        out.append(Finding("fatal", f"paths.state_dir: {d} is not writable by this user"))


def _check_dataset(cfg: Config, out: list[Finding]) -> None:
    name = job.dataset_name(cfg)
    ds = cfg.paths.preprocessed / name
    if not ds.is_dir():
        out.append(Finding("fatal", f"training.dataset: {cfg.training.dataset!r} not found in {cfg.paths.preprocessed} "
                                    "(run nnUNetv2_plan_and_preprocess first)"))
        return
    pf = job.plans_file(cfg)
    try:
        plans = json.loads(pf.read_text())
        confs = plans["configurations"]
    except FileNotFoundError:
        out.append(Finding("fatal", f"training.plans: {pf} does not exist"))
        return
    except (ValueError, KeyError, TypeError) as e:
        out.append(Finding("fatal", f"training.plans: {pf} is not a valid plans file ({e})"))
        return
    if cfg.training.configuration not in confs:
        out.append(Finding("fatal", f"training.configuration: {cfg.training.configuration!r} is not in {pf} "
                                    f"(has: {', '.join(confs)})"))
        return
    from .status import plan_batch_size
    out.append(Finding("ok", f"dataset {name}, configuration {cfg.training.configuration}, "
                             f"batch size {plan_batch_size(cfg)}"))


def _check_results(cfg: Config, out: list[Finding]) -> None:
    fd = job.fold_dir(cfg)
    ck = job.resume_checkpoint(cfg)
    if ck is None:
        out.append(Finding("ok", f"no checkpoint in {fd}: training starts at epoch 0"))
    else:
        out.append(Finding("ok", f"--c will resume from {ck}"))
    base = cfg.paths.results if cfg.paths.results.exists() else cfg.paths.results.parent
    try:
        free = shutil.disk_usage(base).free / 1e9
    except OSError:
        return
    if free < MIN_FREE_GB_FATAL:
        out.append(Finding("fatal", f"only {free:.1f} GB free under {base}: checkpoints will fail"))
    elif free < MIN_FREE_GB_WARN:
        out.append(Finding("warning", f"only {free:.1f} GB free under {base}"))


def _check_command(cfg: Config, out: list[Finding]) -> None:
    env = job.build_env(cfg)
    exe = cfg.training.command[0]
    found = shutil.which(exe, path=env.get("PATH"))
    if found is None:
        out.append(Finding("fatal", f"training.command: {exe!r} not found on PATH"))
    else:
        out.append(Finding("ok", f"training command: {found}"))
    if cfg.training.device == "cuda":
        code = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
        try:
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
            ok = r.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok:
            out.append(Finding("fatal", "training.device = \"cuda\" but torch sees no CUDA device "
                                        "(driver, CUDA_VISIBLE_DEVICES, or a CPU-only torch build?)"))
        else:
            out.append(Finding("ok", "CUDA is available"))


def _check_thermal(cfg: Config, out: list[Finding]) -> None:
    if not cfg.thermal.enabled:
        out.append(Finding("ok", "thermal guard off ([thermal] enabled = false, or device is not cuda)"))
        return
    from .config import ConfigError
    from .gpu import Nvml
    from .thermal import ThermalGuard

    nvml = Nvml.open() if cfg.thermal.source == "nvml" else None
    try:
        guard = ThermalGuard.open(cfg, nvml, log=_Quiet())
    except ConfigError as e:
        out += [Finding("fatal", p) for p in e.problems]
        return
    src = guard.source
    readings = [nvml.read(i) for i in src.indices] if nvml is not None else src.read_once()[0]
    guard.close()
    for r in readings:
        out.append(Finding("ok", f"GPU {r.gpu}: {r.celsius} C now"))
        if r.slowdown_celsius is not None and cfg.thermal.pause_celsius > r.slowdown_celsius:
            out.append(Finding("warning", f"thermal.pause_celsius ({cfg.thermal.pause_celsius:g}) is above GPU {r.gpu}'s "
                                          f"own slowdown temperature ({r.slowdown_celsius:g} C): the GPU will "
                                          "throttle before the guard pauses"))


class _Quiet:
    def __getattr__(self, _name):
        return lambda *a, **k: None


def run_checks(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    _check_dirs(cfg, out)
    _check_dataset(cfg, out)
    _check_results(cfg, out)
    _check_command(cfg, out)
    _check_thermal(cfg, out)
    return out


def render(findings: list[Finding]) -> str:
    mark = {"fatal": "FATAL  ", "warning": "warning", "ok": "ok     "}
    lines = [f"{mark[f.level]} {f.what}" for f in findings]
    n = sum(f.fatal for f in findings)
    lines.append(f"{n} fatal problem(s)" if n else "no fatal problems")
    return "\n".join(lines)
