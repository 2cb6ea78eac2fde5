"""`cardiacseg-train check`: a preflight that lists every problem at once.

How it works: each check appends Findings (fatal, warning or ok) instead of stopping at the first one,
so a new user fixes everything in one pass. What `run` would do is what `check` tests:
- the command is resolved like `run` resolves it (job.resolve_command: PATH, else next to the
  supervisor's own interpreter, which is how a venv install runs under systemd);
- the trainer class is looked up the way nnUNetv2_train does, and torch's CUDA build is read, by
  supervisor/trainer/probe.py in a subprocess with the trainer's environment and a timeout (the
  supervisor itself never imports torch or nnunetv2);
- every place the run will write is tested with os.access on the effective ids: the plans file AND its
  folder (the OOM step-down renames a temp file over it), the fold folder (or the part of
  nnUNet_results it will be created in), the state directory;
- free space on the fold folder's filesystem must hold three checkpoints (the launcher writes a
  temporary copy beside checkpoint_latest and checkpoint_best);
- with device = "cuda", the driver's CUDA version (NVML) is compared with the one torch was built for;
- the known-bad versions (core/known_bad.py: torch nnU-Net excludes, nnunetv2 < 2.6 with torch >= 2.6, a
  numpy-2 checkpoint under numpy 1, the driver) from integrations/environment.py's measurement, also
  with --quick (metadata only), and a cascade stage's input (integrations/cascade.py);
- RAM and /dev/shm for the augmentation workers (integrations/worker_memory.py) and, on CUDA, each GPU's
  uncorrectable ECC errors and pending page retirements or row remaps (integrations/gpu_health.py).
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import job
from supervisor.core import criteria, known_bad
from supervisor.config.loader import Config
from supervisor.integrations import environment, probes, trainer_class
from supervisor.integrations.environment import driver_cuda_version  # noqa: F401  (check's own name for it)
from supervisor.integrations.plans import dataset_problems, plan_batch_size

MIN_FREE_GB_WARN = 10.0
# A checkpoint's size before any exists: the real 3d_lowres run's is ~235 MB, the demo net's ~128 MB.
CHECKPOINT_ESTIMATE_BYTES = 300 * 10**6


@dataclass(frozen=True)
class Finding:
    level: str  # "fatal" | "warning" | "ok"
    what: str

    @property
    def fatal(self) -> bool:
        return self.level == "fatal"


def writable(path: Path) -> bool:
    """May this process (effective uid/gid, as the run will be) create and replace files in path?"""
    eff = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK | os.X_OK, effective_ids=eff) if path.is_dir() else \
        os.access(path, os.W_OK, effective_ids=eff)


def existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_dirs(cfg: Config, out: list[Finding]) -> None:
    for key, p in (("paths.preprocessed", cfg.paths.preprocessed), ("paths.results", cfg.paths.results)):
        if key == "paths.results" and not p.exists():  # nnU-Net makes it (whether it may: _check_writable)
            out.append(Finding("ok", f"{key}: {p} does not exist yet: nnU-Net creates it at the first start"))
            continue
        out.append(Finding("ok", f"{key}: {p}") if p.is_dir() else Finding("fatal", f"{key}: {p} is not a directory"))
    if cfg.paths.raw is not None and not cfg.paths.raw.is_dir():
        out.append(Finding("warning", f"paths.raw: {cfg.paths.raw} is not a directory (only needed for planning)"))


def _check_dataset(cfg: Config, out: list[Finding]) -> None:
    problems = dataset_problems(cfg)
    if problems:
        out += [Finding("fatal", p) for p in problems if not p.startswith("paths.preprocessed")]
        return
    out.append(Finding("ok", f"dataset {job.dataset_name(cfg)}, configuration {cfg.training.configuration}, "
                             f"batch size {plan_batch_size(job.plans_file(cfg), cfg.training.configuration)}"))


def _check_writable(cfg: Config, out: list[Finding]) -> None:
    """Everything the run writes, tested before the run needs it."""
    whom = f"uid {os.geteuid()}"
    pf = job.plans_file(cfg)
    if cfg.oom.enabled and pf.is_file():
        for p, why in ((pf, "the OOM step-down rewrites it"),
                       (pf.parent, "the OOM step-down writes a temp file and the backup there, then renames")):
            if not writable(p):
                out.append(Finding("fatal", f"training.plans: {p} is not writable by {whom} ({why}; "
                                            "or set [oom] enabled = false)"))
    fd = job.fold_dir(cfg)
    base = existing_ancestor(fd)
    if base.is_dir() and not writable(base):
        what = "the fold folder" if base == fd else f"{base}, where the fold folder {fd} will be created,"
        out.append(Finding("fatal", f"paths.results: {what} is not writable by {whom} (checkpoints and logs go there)"))
    sd = existing_ancestor(cfg.paths.state_dir)
    if not writable(sd):
        out.append(Finding("fatal", f"paths.state_dir: {cfg.paths.state_dir} is not writable by {whom}"
                                    + ("" if sd == cfg.paths.state_dir else f" (it would be created in {sd})")))


def checkpoint_room(cfg: Config) -> tuple[int, str]:
    """Bytes the fold folder's filesystem must have free (criteria.space_needed, the disk-full wait's formula
    too), and how that figure was found."""
    sizes = [p.stat().st_size for p in job.existing_checkpoints(cfg)]
    size = max(sizes, default=CHECKPOINT_ESTIMATE_BYTES)
    files = max(1, criteria.PEAK_CHECKPOINT_FILES - len(sizes))
    what = f"the existing checkpoint's {size / 1e6:.0f} MB" if sizes else \
        f"an estimated {size / 1e6:.0f} MB (no checkpoint yet)"
    return criteria.space_needed(size, len(sizes)), f"{files} more checkpoint file(s) of {what}, plus 64 MiB"


def _check_results(cfg: Config, out: list[Finding]) -> None:
    fd = job.fold_dir(cfg)
    ck = job.resume_checkpoint(cfg)
    out.append(Finding("ok", f"no checkpoint in {fd}: training starts at epoch 0" if ck is None
                       else f"--c will resume from {ck}"))
    base = existing_ancestor(fd)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    need, how = checkpoint_room(cfg)
    if free < need:
        out.append(Finding("fatal", f"only {free / 1e9:.2f} GB free under {base}; checkpoints need {need / 1e9:.2f} GB "
                                    f"({how}): checkpoint writes will fail"))
    elif free < MIN_FREE_GB_WARN * 1e9:
        out.append(Finding("warning", f"only {free / 1e9:.1f} GB free under {base}"))


def _check_command(cfg: Config, env: dict, out: list[Finding]) -> None:
    argv = job.resolve_command(cfg, env.get("PATH"))  # exactly what `run` will execute
    exe = argv[0]
    if "/" in exe:
        found = exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None
    else:
        found = shutil.which(exe, path=env.get("PATH"))
    if found is None:
        out.append(Finding("fatal", f"training.command: {exe!r} not found on PATH ({env.get('PATH', '')}) nor "
                                    f"next to {sys.executable}" if "/" not in exe else
                                    f"training.command: {exe} does not exist or is not executable"))
    else:
        out.append(Finding("ok", f"training command: {found}"))


def run_probe(cfg: Config, env: dict) -> tuple[dict | None, str]:
    """supervisor/trainer/probe.py's answer in the trainer's environment, or (None, why not)."""
    return probes.ask("probe", cfg.training.trainer, env)


def _check_trainer(cfg: Config, info: dict | None, why: str, out: list[Finding]) -> None:
    name = cfg.training.trainer
    if info is None:
        out.append(Finding("warning", f"training.trainer: could not look {name!r} up ({why})"))
        return
    if info.get("torch_error"):
        out.append(Finding("fatal", f"torch does not import in the trainer's environment: {info['torch_error']}"))
    if info.get("trainer"):
        out.append(Finding("ok", f"trainer class {info['trainer']}"))
        return
    out.append(Finding("fatal", trainer_class.not_found(name, info) or f"training.trainer: {info.get('trainer_error')}"))


def cuda_mismatch(driver: int | None, built: str | None) -> Finding | None:
    """The driver's CUDA version against torch's build: core/known_bad.py's rule, as a Finding."""
    f = known_bad.cuda_mismatch(driver, built)
    return None if f is None else Finding(f.level, f.text)


def _check_cuda(cfg: Config, info: dict | None, out: list[Finding]) -> None:
    if cfg.training.device != "cuda" or info is None or "torch" not in info:
        return
    if not info.get("torch_cuda"):
        out.append(Finding("fatal", f"training.device = \"cuda\" but torch {info['torch']} is a CPU-only build"))
        return
    driver, why = driver_cuda_version()
    mismatch = cuda_mismatch(driver, info["torch_cuda"])  # reported with the other known-bad versions
    if driver is None:
        out.append(Finding("warning", f"driver CUDA version unknown ({why}): not compared with torch's "
                                      f"CUDA {info['torch_cuda']}"))
    elif mismatch is None:
        out.append(Finding("ok", f"driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, torch built for "
                                 f"CUDA {info['torch_cuda']}"))
    if info.get("cuda_available"):
        out.append(Finding("ok", "CUDA is available"))
    elif mismatch is None or not mismatch.fatal:
        out.append(Finding("fatal", "training.device = \"cuda\" but torch sees no CUDA device "
                                    "(driver, CUDA_VISIBLE_DEVICES, or a CPU-only torch build?)"))


def _check_thermal(cfg: Config, out: list[Finding]) -> None:
    if not cfg.thermal.enabled:
        out.append(Finding("ok", "thermal guard off ([thermal] enabled = false, or device is not cuda)"))
        return
    from supervisor.config.loader import ConfigError
    from supervisor.integrations.nvml import Nvml
    from supervisor.integrations.thermal import ThermalGuard

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


def run_checks(cfg: Config, quick: bool = False, say=lambda text: None) -> list[Finding]:
    """Every finding. A queue's per-job findings (what `--c` resumes from, another trainer on the fold, the
    checkpoint's load) come for each of its jobs, labelled. `quick`: no child process imports torch (the
    trainer class is found by a scan of nnU-Net's files; torch's CUDA build and the checkpoint's load are
    not tested). `say` is told before each step that takes a while."""
    from supervisor.daemon import queue_master
    out: list[Finding] = []
    env = job.build_env(cfg)
    jobs = queue_master.job_configs(cfg)
    _check_dirs(cfg, out)
    _check_dataset(cfg, out)
    _check_writable(cfg, out)
    _per_job(jobs, out, _check_results)
    _check_command(cfg, env, out)
    from supervisor.commands.install import executable
    from supervisor.integrations import service_user  # a service's config: what its user can reach
    out += [Finding(*f) for f in service_user.check_findings(cfg.path, executable())]
    if quick:
        out.append(Finding(*trainer_class.scan(cfg.training.trainer, env)))
        out.append(Finding("ok", "--quick: torch's CUDA build and the resume checkpoint's load were not tested"))
    else:
        say("looking the trainer class up as nnU-Net does, and reading torch's CUDA build (a child process "
            "imports torch: 10-80 s; --quick skips it)")
        info, why = run_probe(cfg, env)
        _check_trainer(cfg, info, why, out)
        _check_cuda(cfg, info, out)
    _check_versions(cfg, jobs, out)
    _check_cascades(cfg, out)
    _check_thermal(cfg, out)
    _per_job(jobs, out, _check_others)
    out += [Finding("fatal", p) for p in queue_master.problems(cfg)]
    from supervisor.integrations import metrics
    from supervisor.integrations import notify
    from supervisor.commands import pack
    from supervisor.integrations import profiling
    if not quick and any(job.resume_checkpoint(c) for _label, c in jobs):
        say("loading the checkpoint `--c` will resume from, as nnU-Net will (a child process imports torch)")
    resume = [] if quick else pack.check_findings(cfg, [c for _label, c in jobs], version_rules=False)
    from supervisor.integrations import gpu_health, worker_memory
    out += [Finding(level, text) for level, text in notify.check_findings(cfg) + metrics.check_findings(cfg)
            + resume + profiling.check_findings(cfg) + worker_memory.check_findings(cfg)
            + gpu_health.config_findings(cfg)]
    return out


def _check_versions(cfg: Config, jobs: list, out: list[Finding]) -> None:
    """The known-bad table (core/known_bad.py) over the trainer environment's versions, measured once
    (metadata only: fast, so --quick does it too); a finding every job shares is said once, others per job."""
    v, why = environment.measure(cfg)
    if v is None:
        out.append(Finding("warning", f"versions of the trainer's environment unknown ({why}): known-bad "
                                      "combinations not checked"))
        return
    per_job = [(label, [Finding(f.level, f.text) for f in environment.findings(jcfg, v)]) for label, jcfg in jobs]
    common = [f for f in per_job[0][1] if all(f in found for _label, found in per_job)]
    out += common
    for label, found in per_job:
        out += [Finding(f.level, label + f.what) for f in found if f not in common]
    if not any(found for _label, found in per_job):
        out.append(Finding("ok", f"versions: {known_bad.describe(v)}: no known-bad combination"))


def _check_cascades(cfg: Config, out: list[Finding]) -> None:
    """A cascade job's input: the previous stage's prediction of every training case (core/cascade.py)."""
    from supervisor.daemon import queue_master
    out += [Finding(level, text) for level, text in queue_master.cascade_findings(cfg)]


def _per_job(jobs: list, out: list[Finding], check) -> None:
    for label, jcfg in jobs:
        found: list[Finding] = []
        check(jcfg, found)
        out += [Finding(f.level, label + f.what) for f in found]


def _check_others(cfg: Config, out: list[Finding]) -> None:
    from supervisor.core.rules_attempt import other_trainers_advice
    from supervisor.integrations import other_trainers
    found = other_trainers.find(cfg)
    if found:
        out.append(Finding("fatal", f"another trainer is already training this fold ({other_trainers.describe(found)}): "
                                    "`run` refuses to start a second one; "
                                    + other_trainers_advice(other_trainers.as_event(found))))


def render(findings: list[Finding]) -> str:
    mark = {"fatal": "FATAL  ", "warning": "warning", "ok": "ok     "}
    lines = [f"{mark[f.level]} {f.what}" for f in findings]
    n = sum(f.fatal for f in findings)
    lines.append(f"{n} fatal problem(s)" if n else "no fatal problems")
    return "\n".join(lines)
