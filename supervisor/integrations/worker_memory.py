"""Will nnU-Net's augmentation workers have the memory they need? `check` asks before the run.

How it works: nnU-Net 2.x starts nnUNet_n_proc_DA training workers and half as many validation workers,
each a copy of the trainer process, and hands their batches to the trainer through torch's shared memory
(files in /dev/shm). When RAM or /dev/shm runs out a worker dies (the kernel's OOM killer, or "unable to
write to file </torch_...>"), and the trainer ends with "One or more background workers are no longer
alive". Docker gives a container a 64 MB /dev/shm unless told otherwise (--shm-size, --ipc=host).

`measure(cfg)` reads /dev/shm's size (os.statvfs), the RAM available (psutil), the workers the trainer
will start (job.configured_workers: [environment], else nnU-Net's default for this host) and one batch's
size from the plans (batch_size x (channels + 1 target) x patch voxels x 4 bytes). The batches in flight
are the augmenters' queues (nnU-Net: max(6, n/2) training and max(3, n/4) validation batches) plus one per
worker. `findings()` turns that into check's lines: a warning when /dev/shm holds less than that or less
than MIN_SHM_BYTES, or when a process has less than MIN_RAM_PER_PROCESS of the available RAM (a rule of
thumb: a 3d_fullres worker holds its cases' arrays and a few patches; the remedy either way is fewer
workers, or more RAM / a bigger --shm-size).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import psutil

from supervisor.config import job

SHM = "/dev/shm"
MIN_SHM_BYTES = 1 << 30               # Docker's 64 MB default is the case this catches
MIN_RAM_PER_PROCESS = 1 << 30         # rule of thumb, see the docstring
GIB = 1 << 30


@dataclass(frozen=True)
class Memory:
    workers: int
    val_workers: int
    shm_bytes: int | None              # None: no /dev/shm (not Linux, or not mounted)
    available_bytes: int
    batch_bytes: int | None            # None: the plans do not say

    @property
    def processes(self) -> int:
        return 1 + self.workers + self.val_workers

    @property
    def shm_needed(self) -> int | None:
        if self.batch_bytes is None:
            return None
        in_flight = max(6, self.workers // 2) + max(3, self.workers // 4) + self.workers + self.val_workers
        return in_flight * self.batch_bytes


def batch_bytes(cfg) -> int | None:
    """One training batch of the configuration, data and target, as float32."""
    from supervisor.core import batch_fit  # the plans' batch and patch size, checked once for every reader
    from supervisor.integrations.plans import PlansError, load

    try:
        plans, name = load(job.plans_file(cfg)), cfg.training.configuration
        bs, voxels = batch_fit.batch_size(plans, name), math.prod(batch_fit.patch_size(plans, name))
        channels = len(json.loads((job.plans_file(cfg).parent / "dataset.json").read_text())
                       .get("channel_names") or {"0": ""})
    except (PlansError, OSError, ValueError, AttributeError):  # FitInputError is a ValueError
        return None
    return bs * (channels + 1) * voxels * 4


def measure(cfg) -> Memory:
    workers = job.configured_workers(cfg)
    try:
        st = os.statvfs(SHM)
        shm = st.f_frsize * st.f_blocks
    except OSError:
        shm = None
    return Memory(workers, max(1, workers // 2), shm, psutil.virtual_memory().available, batch_bytes(cfg))


def findings(m: Memory) -> list[tuple[str, str]]:
    out = []
    who = f"the trainer, {m.workers} training and {m.val_workers} validation augmentation workers"
    per = m.available_bytes / m.processes
    line = (f"RAM: {m.available_bytes / GIB:.1f} GiB available, {per / GIB:.1f} GiB for each of {m.processes} "
            f"processes ({who})")
    if per < MIN_RAM_PER_PROCESS:
        out.append(("warning", line + f": less than {MIN_RAM_PER_PROCESS / GIB:.0f} GiB each; workers may be "
                               "killed (\"background workers are no longer alive\"): lower nnUNet_n_proc_DA in "
                               "[environment]"))
    else:
        out.append(("ok", line))
    if m.shm_bytes is None:
        out.append(("warning", f"{SHM} is not there: torch's workers pass batches through shared memory"))
        return out
    need = m.shm_needed
    line = f"{SHM}: {m.shm_bytes / GIB:.2f} GiB" + (f" (batches in flight need about {need / GIB:.2f} GiB)"
                                                     if need is not None else "")
    if m.shm_bytes < max(MIN_SHM_BYTES, need or 0):
        out.append(("warning", line + ": too small, workers die writing their batches. In Docker: --shm-size=8g "
                               "(or --ipc=host); else lower nnUNet_n_proc_DA"))
    else:
        out.append(("ok", line))
    return out


def check_findings(cfg) -> list[tuple[str, str]]:
    return findings(measure(cfg))
