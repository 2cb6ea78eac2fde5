"""The trainer's environment, measured for the known-bad table (core/known_bad.py): what `check` shows and
what `run` refuses to start with.

How it works
- `measure(cfg)`: supervisor/trainer/versions.py answers in a child with the trainer's environment
  (probes.ask, bounded by VERSIONS_TIMEOUT_S, cut short by a signal): nnunetv2, torch, numpy, torch's
  CUDA build and nnunetv2's own Requires-Dist, from metadata, nothing imported (under a second). With
  device = "cuda" the driver's CUDA version comes from NVML (`driver_cuda_version`).
- `with_checkpoint(cfg, v)`: whether the checkpoint `--c` resumes from was pickled under numpy 2, read
  with checkpoints.read_checkpoint (the inert unpickler pack uses: no torch).
- `findings(cfg, v)`: known_bad.judge for this job (its device; 3D when the plan's patch_size has three
  axes, else by the configuration's name).
- `before_start(cfg, log, cancelled)`: for `run` and the queue master, before anything starts: the fatal
  findings (their texts; the caller refuses the run, exit 2), warnings logged. A probe that cannot
  answer lets the run go on (logged): the table judges what was measured, never a guess.
- A refused start leaves `<state_dir>/start_refused.json` (`record_refused`: when, and the message with
  its fixes) for `status`, which shows it where a person looks after `systemctl start` failed; the next
  start that gets past its checks (and holds the lock) removes it (`clear_refused`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from supervisor.config import job
from supervisor.core import known_bad
from supervisor.integrations import probes
from supervisor.integrations.checkpoints import read_checkpoint
from supervisor.integrations.plans import PlansError, configuration

VERSIONS_TIMEOUT_S = 60  # metadata only: a second on an idle machine


def driver_cuda_version() -> tuple[int | None, str]:
    """NVML's CUDA driver version (e.g. 12020), or (None, why) without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"NVML: {e}"
    try:
        return int(pynvml.nvmlSystemGetCudaDriverVersion_v2()), ""
    except pynvml.NVMLError as e:
        return None, f"NVML: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def from_answer(info: dict, driver: int | None = None) -> known_bad.Versions:
    """versions.py's answer as Versions; a field of the wrong type counts as unknown."""
    def text(k):
        return info.get(k) if isinstance(info.get(k), str) else None
    req = info.get("nnunetv2_requires")
    return known_bad.Versions(nnunetv2=text("nnunetv2"), torch=text("torch"), numpy=text("numpy"),
                              torch_cuda=text("torch_cuda"), driver_cuda=driver,
                              nnunetv2_requires=tuple(x for x in req if isinstance(x, str))
                              if isinstance(req, list) else ())


def measure(cfg, cancelled=None) -> tuple[known_bad.Versions | None, str]:
    """The trainer environment's versions (and the driver's CUDA version for device = "cuda"), or (None, why)."""
    info, why = probes.ask("versions", "-", job.build_env(cfg), timeout=VERSIONS_TIMEOUT_S, cancelled=cancelled)
    if not isinstance(info, dict):
        return None, why or "no answer"
    driver = driver_cuda_version()[0] if cfg.training.device == "cuda" else None
    return from_answer(info, driver), ""


def with_checkpoint(cfg, v: known_bad.Versions) -> known_bad.Versions:
    """v plus what the checkpoint `--c` resumes from says about numpy (unreadable: unknown)."""
    ck = job.resume_checkpoint(cfg)
    if ck is None:
        return v
    try:
        numpy2 = read_checkpoint(ck)["numpy2_pickle"]
    except ValueError:
        numpy2 = None  # verify/`--c` judge a damaged checkpoint; this rule only reads a sound one
    return dataclasses.replace(v, checkpoint=str(ck), checkpoint_numpy2=numpy2)


def three_d(cfg) -> bool:
    """A 3D configuration: the plan's patch_size has three axes (else the name says 3d_...)."""
    try:
        patch = configuration(job.plans_file(cfg), cfg.training.configuration).get("patch_size")
    except PlansError:
        patch = None
    if isinstance(patch, list):
        return len(patch) == 3
    return cfg.training.configuration.startswith("3d")


def findings(cfg, v: known_bad.Versions) -> list[known_bad.Finding]:
    return known_bad.judge(with_checkpoint(cfg, v), cfg.training.device, three_d(cfg))


def before_start(cfg, log, cancelled=None, versions: known_bad.Versions | None = None) -> list[str]:
    """The fatal known-bad findings for this job (texts), warnings logged; [] when the probe cannot tell."""
    if versions is None:
        versions, why = measure(cfg, cancelled)
        if versions is None:
            log.warning("versions_unchecked", why=why, effect="starting; known-bad versions not judged")
            return []
    found = findings(cfg, versions)
    for f in found:
        if not f.fatal:
            log.warning("known_bad_versions", rule=f.rule, problem=f.text)
    if not found:
        log.info("versions_checked", versions=known_bad.describe(versions))
    return [f.text for f in found if f.fatal]


REFUSED_FILE = "start_refused.json"


def record_refused(state_dir, message: str) -> None:
    """Leave the refusal for `status` (best effort: a state directory that cannot be written changes nothing)."""
    from supervisor.integrations.store import atomic_write, safe_mkdir
    try:
        safe_mkdir(Path(state_dir), follow_symlink=True)
        atomic_write(Path(state_dir) / REFUSED_FILE, json.dumps({"at": time.time(), "message": message}).encode())
    except OSError:
        pass


def clear_refused(state_dir) -> None:
    try:
        os.unlink(Path(state_dir) / REFUSED_FILE)
    except OSError:
        pass


def read_refused(state_dir) -> dict | None:
    """{"at": wall time, "message": text} of the last refused start, or None."""
    try:
        data = json.loads((Path(state_dir) / REFUSED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("message"), str) else None
