"""Why is training slow: the bottleneck of an epoch, from what was measured (pure: no I/O, no clock).

How it works: an `EpochProfile` holds one epoch's figures, the trainer's own (time spent waiting for the
next batch, in train steps, in validation; from the launcher's sidecar line) and the machine's (GPU
utilisation, memory and clock-event reasons from NVML; CPU cores used by the trainer and by its
augmentation workers, machine-wide CPU and I/O wait from psutil; built by profile.py).
`verdict(samples, cfg)` names the bottleneck, in this order (the first that holds wins):
1. `unknown`     no epoch time (nothing measured);
2. `storage`     the loop waited for data for >= data_wait_fraction of the epoch, the workers were idle
                 (< worker_idle cores each) and the CPUs waited on I/O (>= iowait_fraction);
3. `data_loading` the loop waited for data for >= data_wait_fraction of the epoch otherwise: workers
                 saturated with free cores (knob: nnUNet_n_proc_DA, sized from the measured wait), or
                 starved of CPU (every core busy), or idle for another reason (knob: twice the workers,
                 to overlap their waits: a suggestion the worker trial measures). Suggestions are capped
                 by the RAM a worker takes. The measured wait decides
                 before the device: a CPU run whose batches arrive late is data_loading, the CPU device
                 is reported beside it;
4. `cpu_device`  the trainer computes on the CPU (device cpu, or torch sees no CUDA);
5. `thermal_throttle` / `power_cap`: thermal (or power) clock-event reasons in >= throttle_fraction
                 of the GPU samples;
6. `gpu_bound`   the healthy case: GPU utilisation >= gpu_busy_percent (or, without NVML, train steps
                 that fill most of the epoch);
7. `unknown`     otherwise (e.g. a GPU mostly idle while the loop does not wait for data), figures shown.
Thresholds come from `cfg.diagnose` when the config has such a section, else from `Thresholds()`.
`changed()` tells the policy when to warn (the kind changed to something other than gpu_bound);
`check_findings(cfg)` is the static part of `check` (workers vs cores, where the preprocessed data lie).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

HEALTHY = "gpu_bound"
# nvmlClocksEventReasons bits (nvml.h): what lowers the clocks of a busy GPU
THERMAL_BITS = 0x20 | 0x40            # SwThermalSlowdown, HwThermalSlowdown
HW_SLOWDOWN, HW_POWER_BRAKE = 0x8, 0x80
POWER_BITS = 0x4 | HW_POWER_BRAKE     # SwPowerCap, HwPowerBrakeSlowdown


@dataclass(frozen=True)
class Thresholds:
    data_wait_fraction: float = 0.20  # of the epoch spent waiting for batches: the loader is the limit
    worker_busy: float = 0.75         # cores per worker at which the workers count as saturated
    worker_idle: float = 0.30         # cores per worker below which they count as idle
    iowait_fraction: float = 0.05     # of all CPU time waiting on I/O (a few blocked workers on many cores)
    machine_busy: float = 0.90        # of all cores busy: no free core for another worker
    throttle_fraction: float = 0.50   # of GPU samples with thermal/power clock-event reasons
    gpu_busy_percent: float = 70.0    # mean GPU utilisation of a GPU-bound run


THRESHOLDS = Thresholds()  # fixed: measured on nnU-Net's loops, not a config section
RAM_RESERVE_MIB = 1024.0  # RAM left free when more workers are suggested


@dataclass(frozen=True)
class EpochProfile:
    """One epoch, measured: the launcher's timings and the supervisor's machine samples (None = unknown)."""
    epoch: int
    data_wait_s: float | None = None     # training loop blocked in next(dataloader_train)
    step_s: float | None = None          # train phase minus that wait (synchronised on CUDA)
    val_s: float | None = None
    epoch_s: float | None = None         # on_epoch_start .. end of on_epoch_end (checkpoints included)
    gpu_util_mean: float | None = None   # percent, NVML utilization.gpu averaged over the samples
    gpu_mem_mib: float | None = None     # highest memory.used seen
    clock_event_reasons: tuple = ()      # one nvmlDeviceGetCurrentClocksEventReasons bitmask per sample
    cpu_trainer: float | None = None     # cores used by the trainer process
    cpu_workers: float | None = None     # cores used by its descendants (augmentation workers)
    n_workers: int | None = None         # nnUNet_n_proc_DA as the trainer resolved it
    cores: int | None = None
    iowait_fraction: float | None = None  # of all CPU time, machine-wide
    device: str | None = None            # "cuda:0", "cpu", "mps"
    torch_cuda_available: bool | None = None
    cpu_machine: float | None = None     # cores busy machine-wide (ours and everybody else's)
    val_data_wait_s: float | None = None
    samples: int = 0                     # machine samples behind the means
    mem_available_mib: float | None = None  # the machine's available RAM at the epoch's end
    worker_rss_mib: float | None = None  # the largest resident size of one augmentation worker

    def to_json(self) -> dict:
        d = asdict(self)
        d["clock_event_reasons"] = list(self.clock_event_reasons)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "EpochProfile":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["clock_event_reasons"] = tuple(int(x) for x in d.get("clock_event_reasons") or ())
        return cls(**kw)


@dataclass(frozen=True)
class Verdict:
    kind: str
    figures: dict = field(default_factory=dict)
    knob: str | None = None             # what to change, e.g. "nnUNet_n_proc_DA=12"
    gain_estimate: float | None = None  # fraction of the epoch time it should save (0.4 = 40 % shorter)
    text: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Verdict":
        return cls(kind=str(d.get("kind", "unknown")), figures=dict(d.get("figures") or {}),
                   knob=d.get("knob"), gain_estimate=d.get("gain_estimate"), text=str(d.get("text", "")))


def combine(profiles) -> EpochProfile:
    """Several epochs as one (times summed, rates weighted by epoch time); the last epoch's facts."""
    ps = list(profiles)
    last = ps[-1]

    def total(name):
        vals = [getattr(p, name) for p in ps]
        return None if any(v is None for v in vals) else sum(vals)

    def mean(name):
        pairs = [(getattr(p, name), p.epoch_s or 0.0) for p in ps if getattr(p, name) is not None]
        w = sum(x for _, x in pairs)
        return (sum(v * x for v, x in pairs) / w if w else sum(v for v, _ in pairs) / len(pairs)) if pairs else None

    return replace(last, data_wait_s=total("data_wait_s"), step_s=total("step_s"), val_s=total("val_s"),
                   epoch_s=total("epoch_s"), val_data_wait_s=total("val_data_wait_s"),
                   gpu_util_mean=mean("gpu_util_mean"), cpu_trainer=mean("cpu_trainer"),
                   cpu_workers=mean("cpu_workers"), iowait_fraction=mean("iowait_fraction"),
                   cpu_machine=mean("cpu_machine"),
                   gpu_mem_mib=max((p.gpu_mem_mib for p in ps if p.gpu_mem_mib is not None), default=None),
                   clock_event_reasons=tuple(r for p in ps for r in p.clock_event_reasons),
                   samples=sum(p.samples for p in ps))


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _c(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def on_cpu(p: EpochProfile) -> bool:
    dev = (p.device or "").lower()
    return dev.startswith("cpu") or (p.torch_cuda_available is False and not dev.startswith("mps"))


def _data_verdict(p: EpochProfile, th: Thresholds, figs: dict) -> Verdict:
    wait, step, epoch = p.data_wait_s, p.step_s or 0.0, p.epoch_s
    n, cores = p.n_workers or 0, p.cores
    per_worker = (p.cpu_workers / n) if (n and p.cpu_workers is not None) else None
    used = f"{_c(p.cpu_workers)} of {cores if cores else '?'} cores used by {n} workers"
    cpu_note = "; the trainer also computes on the CPU (device cpu): a GPU comes next" if on_cpu(p) else ""
    figs.update(workers_cores=p.cpu_workers, per_worker_cores=per_worker, machine_cores_busy=p.cpu_machine)
    head = f"data wait {_pct(wait / epoch)} of the epoch"
    if n and per_worker is None:
        return Verdict("data_loading", figs, None, None,
                       f"{head}; {n} workers, their CPU not measured (the supervisor's samples tell whether "
                       f"more workers would help){cpu_note}")
    idle = n > 0 and per_worker is not None and per_worker < th.worker_idle
    if idle and p.iowait_fraction is not None and p.iowait_fraction >= th.iowait_fraction:
        return Verdict("storage", figs, "copy nnUNet_preprocessed to a local SSD/NVMe disk", None,
                       f"{head}; workers idle ({used}) while the CPUs wait on I/O "
                       f"{_pct(p.iowait_fraction)} of the time: the disk holding the preprocessed data "
                       f"is too slow{cpu_note}")
    if p.cpu_machine is not None and cores:
        free = max(0.0, cores - p.cpu_machine)
    elif cores and p.cpu_workers is not None and p.cpu_trainer is not None:
        free = max(0.0, cores - p.cpu_workers - p.cpu_trainer)
    else:
        free = None
    figs["free_cores"] = free
    saturated = n == 0 or (per_worker is not None and per_worker >= th.worker_busy)
    ram_cap = None
    if p.mem_available_mib is not None and p.worker_rss_mib:
        # each added training worker brings half a validation worker along (nnU-Net starts n/2 of those),
        # each a copy of its size; 1 GiB stays free for the trainer and the page cache
        ram_cap = n + int(max(0.0, p.mem_available_mib - RAM_RESERVE_MIB) / (1.5 * p.worker_rss_mib))
        figs["ram_cap_workers"] = ram_cap
    if saturated and free is not None and free >= 1 and step > 0:
        # batches are produced n/(wait+step) per second of loop; keeping up with the steps needs
        # n*(wait+step)/step workers (for n = 0, the loop itself augments: wait/step workers)
        train = wait + step
        needed = math.ceil((n * train if n else wait) / step)
        cap = n + int(free / max(per_worker or 1.0, 0.5))
        if cores:
            cap = min(cap, cores - max(1, math.ceil(p.cpu_trainer or 1.0)))
        if ram_cap is not None:
            cap = min(cap, ram_cap)
        if cap <= n:
            return Verdict("data_loading", figs, "more RAM, or fewer other processes", None,
                           f"{head}; {used}: more workers would help but the RAM for them is not free "
                           f"({_c(p.mem_available_mib)} MiB available, {_c(p.worker_rss_mib)} MiB a worker)"
                           f"{cpu_note}")
        k = max(n + 1, min(needed, cap))
        new_train = max(step, train * n / k) if n else max(step, wait / k)
        gain = max(0.0, (train - new_train) / epoch)
        figs.update(suggested_workers=k, needed_workers=needed)
        return Verdict("data_loading", figs, f"nnUNet_n_proc_DA={k}", round(gain, 3),
                       f"{head}; {used}: try nnUNet_n_proc_DA={k} (epochs about {_pct(gain)} shorter)"
                       f"{cpu_note}")
    if saturated or (free is not None and p.cpu_machine is not None and cores
                     and p.cpu_machine >= th.machine_busy * cores):
        return Verdict("data_loading", figs, "free CPU cores (stop other jobs), or a machine with more cores",
                       None, f"{head}; {used}, machine {_c(p.cpu_machine)} of {cores} cores busy: the "
                       f"workers are starved of CPU, more workers cannot help{cpu_note}")
    idle_text = (f"{head}; {used}: the workers are neither busy nor waiting on a local disk (a network "
                 f"filesystem, a lock, a slow decoder?)")
    # Idle workers wait on something else than a core: more of them overlap the waits, at little CPU. How much
    # that helps cannot be told from here: it is a suggestion for the trial (core/rules_tune.py) to measure.
    k = min(max(n + 1, 2 * n), 2 * cores if cores else 2 * n + 1, ram_cap if ram_cap is not None else 2 * n + 1)
    if n and per_worker is not None and k > n:
        figs["suggested_workers"] = k
        return Verdict("data_loading", figs, f"nnUNet_n_proc_DA={k}", None,
                       f"{idle_text}: more of them may overlap the waits: try nnUNet_n_proc_DA={k} (measured by "
                       f"the worker trial, [tune] workers){cpu_note}")
    return Verdict("data_loading", figs, None, None, f"{idle_text}{cpu_note}")


def verdict(samples, cfg=None) -> Verdict:
    """The bottleneck of an EpochProfile (or of several epochs, combined); see the module's doc."""
    th = THRESHOLDS
    p = samples if isinstance(samples, EpochProfile) else combine(samples)
    if not p.epoch_s or p.epoch_s <= 0 or p.data_wait_s is None:
        return Verdict("unknown", {"epoch": p.epoch}, None, None, "no epoch timing measured yet")
    wait_frac = p.data_wait_s / p.epoch_s
    figs = {"epoch": p.epoch, "epoch_s": round(p.epoch_s, 3), "data_wait_fraction": round(wait_frac, 4),
            "step_fraction": round((p.step_s or 0.0) / p.epoch_s, 4), "device": p.device,
            "gpu_util_mean": p.gpu_util_mean, "cores": p.cores, "workers": p.n_workers}
    if wait_frac >= th.data_wait_fraction:
        return _data_verdict(p, th, figs)
    if on_cpu(p):
        why = "device cpu" if (p.device or "").lower().startswith("cpu") else "torch sees no CUDA GPU"
        return Verdict("cpu_device", figs, 'device = "cuda" with a torch build that fits the driver '
                       "(see `cardiacseg-train check`)", None,
                       f"the trainer computes on the CPU ({why}); train steps {_pct(figs['step_fraction'])} "
                       f"of the epoch: a GPU is typically 10x faster or more")
    reasons = p.clock_event_reasons
    if reasons:
        thermal = sum(1 for r in reasons if r & THERMAL_BITS or (r & HW_SLOWDOWN and not r & HW_POWER_BRAKE))
        power = sum(1 for r in reasons if r & POWER_BITS)
        figs.update(thermal_samples=thermal, power_samples=power, gpu_samples=len(reasons))
        if thermal / len(reasons) >= th.throttle_fraction:
            return Verdict("thermal_throttle", figs, "cooling: airflow, fan curve, room temperature", None,
                           f"GPU clocks lowered for heat in {thermal} of {len(reasons)} samples "
                           f"(utilisation {_c(p.gpu_util_mean)} %)")
        if power / len(reasons) >= th.throttle_fraction:
            return Verdict("power_cap", figs, "the GPU's power limit (nvidia-smi -q -d POWER; nvidia-smi -pl)",
                           None, f"GPU clocks held at the power limit in {power} of {len(reasons)} samples "
                           f"(utilisation {_c(p.gpu_util_mean)} %)")
    busy = (p.gpu_util_mean >= th.gpu_busy_percent) if p.gpu_util_mean is not None \
        else figs["step_fraction"] >= 0.5
    if busy:
        util = "GPU utilisation unknown" if p.gpu_util_mean is None else f"GPU {p.gpu_util_mean:.0f} % busy"
        return Verdict(HEALTHY, figs, None, None, f"{util}, data wait {_pct(wait_frac)} of the epoch: "
                       "the GPU is the limit (healthy)")
    return Verdict("unknown", figs, None, None,
                   f"GPU {_c(p.gpu_util_mean)} % busy although the loop waits for data only "
                   f"{_pct(wait_frac)} of the epoch; train steps {_pct(figs['step_fraction'])}, validation "
                   f"{_c(p.val_s)} s of {_c(p.epoch_s)} s")


def changed(previous_kind: str | None, new: Verdict) -> bool:
    """Warn (once per change) when the verdict changes to something other than gpu_bound."""
    return new.kind != HEALTHY and new.kind != previous_kind


def log_fields(v: Verdict) -> dict:
    """The fields of the `bottleneck` warning (and its notification)."""
    return {"bottleneck": v.kind, "why": v.text, "knob": v.knob,
            "data_wait_fraction": v.figures.get("data_wait_fraction"), "gain_estimate": v.gain_estimate}


# ---- the static part of `check` ---------------------------------------------------------------------
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
              "9p", "afs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.juicefs")


def static_findings(workers: int, cores: int, device: str, fs: dict | None) -> list[tuple[str, str]]:
    """Pure: nnUNet_n_proc_DA against the cores, and the filesystem of the preprocessed data.
    fs: {"path", "mount", "type", "rotational" (True/False/None), "virtual"} or None when unknown."""
    out = []
    spare = cores - (1 if device != "cpu" else max(1, cores // 2))  # a CPU run's steps need cores too
    if workers == 0:
        out.append(("warning", "nnUNet_n_proc_DA=0: augmentation runs inside the training loop, which "
                               f"waits for every batch; try nnUNet_n_proc_DA={max(1, spare)}"))
    elif workers > max(1, spare):
        out.append(("warning", f"nnUNet_n_proc_DA={workers} with {cores} CPU cores: the workers and the "
                               f"trainer compete for CPU; at most {max(1, spare)} fit"))
    else:
        out.append(("ok", f"nnUNet_n_proc_DA={workers} for {cores} CPU cores (`status` tells whether the "
                          "GPU waits for them)"))
    if fs is None:
        return out
    where = f"{fs['path']} is on {fs.get('type') or '?'} ({fs.get('mount') or '?'})"
    if (fs.get("type") or "") in NETWORK_FS or (fs.get("type") or "").startswith("fuse."):
        out.append(("warning", f"preprocessed data: {where}, a network or FUSE filesystem: every batch is "
                               "read through it; copy nnUNet_preprocessed to a local SSD"))
    elif fs.get("rotational"):
        out.append(("warning", f"preprocessed data: {where}, a spinning disk: random reads of many cases "
                               "are slow; a local SSD is faster"))
    else:
        out.append(("ok", f"preprocessed data: {where}" + (", an SSD" if fs.get("rotational") is False else
                                                          ", a virtual machine's disk" if fs.get("virtual") else "")))
    return out
