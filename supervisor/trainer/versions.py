"""The trainer environment's versions, for the known-bad table (core/known_bad.py): run as a script, never
imported by the supervisor.

How it works: `python -m supervisor.trainer.versions` in the trainer's environment (job.build_env, started
by integrations/probes.ask) reads the installed distributions' metadata (importlib.metadata: nothing is
imported, so it answers in a fraction of a second, also for `run`'s start-up and `check --quick`):
nnunetv2, torch and numpy versions, nnunetv2's Requires-Dist lines (its own requirement on torch), and
torch's CUDA build from torch/version.py read as text (`cuda: Optional[str] = '12.8'`; None for a
CPU-only build). The last stdout line is `CARDIACSEG_PROBE <json>`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from importlib import metadata

from supervisor.integrations.probes import MARKER

_CUDA = re.compile(r"""^cuda\s*(?::[^=\n]*)?=\s*(?:'([^']*)'|"([^"]*)"|None)\s*$""", re.M)


def torch_cuda() -> str | None:
    """torch.version.cuda without importing torch (None: a CPU-only build, or torch not found)."""
    try:
        spec = importlib.util.find_spec("torch")  # a top-level package: found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        with open(os.path.join(spec.submodule_search_locations[0], "version.py"), encoding="utf-8") as fh:
            m = _CUDA.search(fh.read())
    except OSError:
        return None
    return (m.group(1) or m.group(2)) if m and (m.group(1) or m.group(2)) else None


def versions() -> dict:
    out: dict = {}
    for dist in ("nnunetv2", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["nnunetv2_requires"] = list(metadata.requires("nnunetv2") or [])
    except metadata.PackageNotFoundError:
        out["nnunetv2_requires"] = []
    out["torch_cuda"] = torch_cuda() if out["torch"] else None
    return out


if __name__ == "__main__":
    print(MARKER + json.dumps(versions()), flush=True)
