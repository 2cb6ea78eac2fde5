"""Measuring where the epochs' time goes: the launcher's sidecar file, and the machine around the trainer.

How it works (an adapter: it measures, diagnose.verdict decides):
- `ProfileFollower(path)` follows the file the launcher appends one JSON line per epoch to
  (CARDIACSEG_PROFILE_FILE, see supervisor/trainer/epoch_timer.py). `poll()` returns the complete new
  lines as dicts: a partial last line waits for its newline; a line longer than MAX_LINE, or one that is
  not a JSON object, is skipped; a file that shrank or was replaced is read again from the start.
- `MachineSampler(nvml, pids_fn)`: `sample(now)` reads, every SAMPLE_S at most (cheaper calls return at
  once): the CPU seconds of the trainer and of its descendants (psutil; Process objects cached by pid and
  start time, so a reused pid is never ours), the machine's CPU times (busy and iowait), and per GPU the
  NVML utilisation, memory used and clock-event reason bitmask (NVMLError: that reading is unknown).
  `epoch_summary()` returns the means since the previous call and starts a new window.
- `make_profile(line, summary, cfg)` joins both into a diagnose.EpochProfile.
- `storage_of(path)`: the mount, filesystem type and (for a local block device) whether it spins, for
  check. Tests fake pynvml with its real exception classes; psutil and /proc are the real ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

from supervisor.core.diagnose import EpochProfile, static_findings

__all__ = ["EpochProfile", "MachineSampler", "ProfileFollower", "make_profile", "storage_of"]
MAX_LINE = 64 * 1024
SAMPLE_S = 5.0


class ProfileFollower:
    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0
        self.ino = None
        self.partial = b""
        self.skipping = False  # inside an over-long line: drop bytes up to its newline

    def poll(self) -> list[dict]:
        try:
            st = self.path.stat()
            if st.st_ino != self.ino or st.st_size < self.offset:
                self.ino, self.offset, self.partial, self.skipping = st.st_ino, 0, b"", False
            if st.st_size == self.offset:
                return []
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(max(0, min(st.st_size - self.offset, 16 * MAX_LINE)))
        except OSError:
            return []
        self.offset += len(data)
        out = []
        *lines, rest = (self.partial + data).split(b"\n")
        for raw in lines:
            if self.skipping:
                self.skipping = False
                continue
            rec = self._parse(raw)
            if rec is not None:
                out.append(rec)
        if len(rest) > MAX_LINE:
            rest, self.skipping = b"", True
        self.partial = rest
        return out

    @staticmethod
    def _parse(raw: bytes) -> dict | None:
        if not raw.strip() or len(raw) > MAX_LINE:
            return None
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None
        return rec if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) else None


class MachineSampler:
    """GPU and CPU readings while an attempt trains; one window per epoch (`epoch_summary`)."""

    def __init__(self, nvml, pids_fn, gpus: list[int] | None = None, interval_s: float = SAMPLE_S):
        self.nvml, self.pids_fn, self.gpus, self.interval = nvml, pids_fn, gpus, interval_s
        self.next_at = float("-inf")
        self.procs: dict[int, psutil.Process] = {}
        self.trainer_pid: int | None = None
        self.last: tuple | None = None  # (now, machine busy s, iowait s, total s)
        self.prev_cpu: dict[int, float] = {}  # pid -> CPU seconds at the previous sample
        self._reset()

    def _reset(self) -> None:
        self.w = {"span": 0.0, "trainer": 0.0, "workers": 0.0, "busy": 0.0, "iowait": 0.0, "total": 0.0,
                  "util": [], "mem": [], "reasons": [], "n": 0, "nprocs": 0}

    def _proc(self, pid: int) -> psutil.Process | None:
        p = self.procs.get(pid)
        if p is None:
            try:
                p = self.procs[pid] = psutil.Process(pid)
            except psutil.Error:
                return None
        return p

    def _cpu(self, pid: int) -> float:
        p = self._proc(pid)
        if p is None:
            return 0.0
        try:
            if not p.is_running():  # pid reused by another process: forget it
                self.procs.pop(pid, None)
                return 0.0
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            self.procs.pop(pid, None)
            return 0.0

    def sample(self, now: float) -> bool:
        """Take a reading if SAMPLE_S passed since the last one; True when one was taken."""
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        trainer, workers = self.pids_fn()
        self.trainer_pid = trainer
        workers = [pid for pid in workers if pid != trainer]
        cpu = {pid: self._cpu(pid) for pid in ([trainer] if trainer else []) + workers}
        self.procs = {pid: p for pid, p in self.procs.items() if pid in cpu}
        m = psutil.cpu_times()
        idle = m.idle + getattr(m, "iowait", 0.0)
        total = sum(m)  # guest time is counted inside user on Linux, but the ratio stays right
        cur = (now, total - idle, getattr(m, "iowait", 0.0), total)
        if self.last is not None and now > self.last[0]:
            # per process: one that ended takes its CPU seconds along, one that is new was born since
            d = {pid: max(0.0, v - self.prev_cpu.get(pid, 0.0)) for pid, v in cpu.items()}
            self.w["trainer"] += d.get(trainer, 0.0)
            self.w["workers"] += sum(v for pid, v in d.items() if pid != trainer)
            for key, i in (("span", 0), ("busy", 1), ("iowait", 2), ("total", 3)):
                self.w[key] += max(0.0, cur[i] - self.last[i])
        self.last, self.prev_cpu = cur, cpu
        self.w["n"] += 1
        self.w["nprocs"] = max(self.w["nprocs"], len(workers))
        self._gpu(trainer, workers)
        return True

    def _gpu(self, trainer, workers) -> None:
        if self.nvml is None:
            return
        nv = getattr(self.nvml, "nv", self.nvml)  # gpu.Nvml, or the pynvml module itself
        indices = self.gpus
        try:
            if indices is None:
                ours = {trainer, *workers}
                indices = [i for i in range(nv.nvmlDeviceGetCount())
                           if {int(p.pid) for p in nv.nvmlDeviceGetComputeRunningProcesses(
                               nv.nvmlDeviceGetHandleByIndex(i))} & ours]
        except nv.NVMLError:
            return
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(nv, "nvmlDeviceGetCurrentClocksThrottleReasons")
        for i in indices:
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except nv.NVMLError:
                continue
            for key, fn in (("util", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
                            ("mem", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20),
                            ("reasons", lambda: int(reasons_fn(h)))):
                try:
                    self.w[key].append(fn())
                except nv.NVMLError:  # NotSupported & co: unknown, never 0
                    pass

    def _memory(self) -> dict:
        """Once an epoch (not every sample: the budget): available RAM, the largest worker's resident size."""
        rss = []
        for pid, p in self.procs.items():
            if pid == self.trainer_pid:
                continue
            try:
                rss.append(p.memory_info().rss / 2**20)
            except psutil.Error:
                continue
        return {"mem_available_mib": round(psutil.virtual_memory().available / 2**20, 1),
                "worker_rss_mib": round(max(rss), 1) if rss else None}

    def epoch_summary(self) -> dict:
        """Means since the previous call (None where nothing was measured); starts a new window."""
        w, span = self.w, self.w["span"]
        out = {"samples": w["n"], "seconds": round(span, 3), "cores": psutil.cpu_count() or os.cpu_count(),
               "cpu_trainer": w["trainer"] / span if span else None,
               "cpu_workers": w["workers"] / span if span else None,
               "cpu_machine": (w["busy"] / w["total"]) * (psutil.cpu_count() or 1) if w["total"] else None,
               "iowait_fraction": w["iowait"] / w["total"] if w["total"] else None,
               "gpu_util_mean": sum(w["util"]) / len(w["util"]) if w["util"] else None,
               "gpu_mem_mib": round(max(w["mem"]), 1) if w["mem"] else None,
               "clock_event_reasons": list(w["reasons"]), "processes": w["nprocs"],
               **self._memory()}
        self._reset()
        return out


def _num(d: dict, k: str):
    v = d.get(k)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def make_profile(line: dict, summary: dict | None, cfg=None) -> EpochProfile:
    """One epoch: the launcher's sidecar line + the sampler's summary for the same window."""
    s = summary or {}
    device = line.get("device") if isinstance(line.get("device"), str) else None
    if device is None and cfg is not None:
        device = cfg.training.device
    n = line.get("n_proc_da")
    cuda = line.get("torch_cuda_available")
    return EpochProfile(
        epoch=int(line["epoch"]), data_wait_s=_num(line, "data_wait_s"), step_s=_num(line, "step_s"),
        val_s=_num(line, "val_s"), epoch_s=_num(line, "epoch_s"), val_data_wait_s=_num(line, "val_data_wait_s"),
        gpu_util_mean=_num(s, "gpu_util_mean"), gpu_mem_mib=_num(s, "gpu_mem_mib"),
        clock_event_reasons=tuple(int(r) for r in s.get("clock_event_reasons") or ()),
        cpu_trainer=_num(s, "cpu_trainer"), cpu_workers=_num(s, "cpu_workers"),
        n_workers=n if isinstance(n, int) and not isinstance(n, bool) else s.get("processes"),
        cores=s.get("cores"), iowait_fraction=_num(s, "iowait_fraction"), cpu_machine=_num(s, "cpu_machine"),
        device=device, torch_cuda_available=cuda if isinstance(cuda, bool) else None,
        samples=int(s.get("samples") or 0), mem_available_mib=_num(s, "mem_available_mib"),
        worker_rss_mib=_num(s, "worker_rss_mib"))


def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \\ooo
    return field.encode().decode("unicode_escape") if "\\" in field else field


# Where a block device's sysfs path shows a virtual machine's disk: its `rotational` is the hypervisor's
# default (virtio-blk says 1), not what the host's storage is.
VIRTUAL_DISK = ("/virtio", "/xen", "/vmbus", "/vbd-")


def storage_of(path, mountinfo: str = "/proc/self/mountinfo", sysfs: str = "/sys") -> dict | None:
    """{"path", "mount", "type", "rotational", "virtual"} for the filesystem holding path; None when unknown.
    rotational: True/False from the block device's queue/rotational, None when unknown or a virtual disk."""
    try:
        real = os.path.realpath(path)
        dev = os.stat(real).st_dev
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    best = None
    for line in text.splitlines():
        parts = line.split(" ")
        if " - " not in line or len(parts) < 5:
            continue
        mount = _unescape(parts[4])
        fstype = line.split(" - ", 1)[1].split(" ")[0]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) >= len(best[0])):
            best = (mount, fstype)
    if best is None:
        return None
    rot, block = None, f"{sysfs}/dev/block/{os.major(dev)}:{os.minor(dev)}"
    virtual = any(v in os.path.realpath(block) for v in VIRTUAL_DISK)
    for cand in (f"{block}/queue/rotational", f"{block}/../queue/rotational"):
        try:
            rot = None if virtual else Path(cand).read_text().strip() == "1"
            break
        except OSError:
            continue
    return {"path": str(path), "mount": best[0], "type": best[1], "rotational": rot, "virtual": virtual}


def check_findings(cfg) -> list[tuple[str, str]]:
    """check's static findings for cfg as (level, text), level "warning" or "ok" (never fatal)."""
    from supervisor.config import job

    data = cfg.paths.preprocessed / job.dataset_name(cfg)
    return static_findings(job.configured_workers(cfg), os.cpu_count() or 1, cfg.training.device,
                           storage_of(data if data.exists() else cfg.paths.preprocessed))
