"""The NVML adapter: the only module that talks to pynvml (from the nvidia-ml-py distribution).

How it works
- `Nvml.open()` initialises NVML and returns an adapter, or None when there is no library or driver
  (NVMLError_LibraryNotFound / DriverNotLoaded); `Nvml.open_error()` says why. NVML is optional for the
  OOM and hang checks and never crashes the loop; the thermal guard requires it (or a command source).
- Every query catches pynvml.NVMLError: a metric that raises NotSupported (or anything else) is None,
  "unknown", never 0. NVMLError_GpuIsLost is reported as `lost=True` on the reading.
- Devices are named by NVML index, UUID ("GPU-...") and PCI bus id. NVML ignores CUDA_VISIBLE_DEVICES
  and may order devices differently from CUDA, so `select()` maps what the training uses: UUIDs exactly;
  indices through PCI bus order, which is CUDA's order when CUDA_DEVICE_ORDER=PCI_BUS_ID (the supervisor
  sets that for the trainer unless [environment] says otherwise).
- Tests replace the `pynvml` module object the adapter holds with a fake raising the real exception
  classes. Inside a container NVML may report host pids, which then never match ours.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from supervisor.config import job

# Clock-event (throttle) reason bits, from nvml.h.
THROTTLE_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
                 0x100: "display_clocks"}


@dataclass
class Reading:
    gpu: str                       # the name used in config and status: the NVML index as a string
    celsius: float | None = None
    slowdown_celsius: float | None = None
    shutdown_celsius: float | None = None
    power_w: float | None = None
    util_percent: int | None = None
    mem_used_mib: float | None = None
    throttle: list[str] = field(default_factory=list)
    lost: bool = False
    uuid: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Nvml:
    _last_error: str | None = None

    def __init__(self, nvml_module):
        self.nv = nvml_module
        self.count = nvml_module.nvmlDeviceGetCount()

    @classmethod
    def open(cls, module=None) -> "Nvml | None":
        try:
            if module is None:
                import pynvml as module
        except ImportError as e:
            cls._last_error = f"pynvml not importable ({e})"
            return None
        try:
            module.nvmlInit()
            return cls(module)
        except module.NVMLError as e:
            cls._last_error = f"{type(e).__name__}: {e}"
            return None

    @classmethod
    def open_error(cls) -> str | None:
        return cls._last_error

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass

    def _get(self, fn, *args):
        try:
            return fn(*args)
        except self.nv.NVMLError:
            return None

    def devices(self) -> list[dict]:
        """[{index, uuid, bus}] in NVML order (unknown fields None)."""
        out = []
        for i in range(self.count):
            h = self._get(self.nv.nvmlDeviceGetHandleByIndex, i)
            uuid = self._get(self.nv.nvmlDeviceGetUUID, h) if h is not None else None
            pci = self._get(self.nv.nvmlDeviceGetPciInfo, h) if h is not None else None
            out.append({"index": i, "uuid": _s(uuid) if uuid else None,
                        "bus": _s(pci.busId).lower() if pci is not None else None})
        return out

    def select(self, visible: str | None, num_gpus: int = 1) -> tuple[list[int], str | None]:
        """NVML indices of the GPUs the training uses, and a problem message (None when fine)."""
        devs = self.devices()
        by_bus = sorted(devs, key=lambda d: (d["bus"] is None, d["bus"] or "", d["index"]))
        if visible is None or not visible.strip():
            return [d["index"] for d in by_bus[:max(1, num_gpus)]], None
        chosen = []
        for item in (x.strip() for x in visible.split(",") if x.strip()):
            if item.startswith(("GPU-", "MIG-")):
                hit = [d["index"] for d in devs if d["uuid"] and d["uuid"].startswith(item)]
                if not hit:
                    return [], f"CUDA_VISIBLE_DEVICES names {item}, which NVML does not know"
                chosen.append(hit[0])
            elif item.lstrip("-").isdigit():
                k = int(item)
                if k < 0:
                    break  # CUDA stops at the first invalid entry
                if k >= len(by_bus):
                    return [], f"CUDA_VISIBLE_DEVICES names GPU {k}, but NVML sees {len(by_bus)}"
                chosen.append(by_bus[k]["index"])
            else:
                return [], f"CUDA_VISIBLE_DEVICES entry {item!r} is neither an index nor a GPU-<uuid>"
        return chosen[:max(1, num_gpus)] if chosen else [], None

    def identity(self, index: int) -> tuple[str, str | None, int | None] | None:
        """(UUID, name, total memory in bytes) of one device; None when NVML cannot name it."""
        h = self._get(self.nv.nvmlDeviceGetHandleByIndex, index)
        uuid = self._get(self.nv.nvmlDeviceGetUUID, h) if h is not None else None
        if not uuid:
            return None
        name = self._get(self.nv.nvmlDeviceGetName, h)
        mem = self._get(self.nv.nvmlDeviceGetMemoryInfo, h)
        return _s(uuid), _s(name) if name else None, int(mem.total) if mem is not None else None

    def training_gpus(self, cfg) -> tuple[list[int], str | None]:
        """NVML indices of the GPUs this job trains on, for the watchers (thermal guard, health): [thermal]
        gpus when listed, else CUDA_VISIBLE_DEVICES as CUDA will number them; ([], the problem) when that
        cannot be told."""
        if cfg.thermal.gpus:
            bad = [g for g in cfg.thermal.gpus if not g.isdigit() or int(g) >= self.count]
            if bad:
                return [], f"thermal.gpus: {bad} are not NVML indices 0..{self.count - 1}"
            return [int(g) for g in cfg.thermal.gpus], None
        idx, why = self.select(job.build_env(cfg).get("CUDA_VISIBLE_DEVICES"), cfg.training.num_gpus)
        if why or not idx:
            return [], f"thermal.gpus: {why or 'no GPU found'}; list them explicitly"
        return idx, None

    def read(self, index: int) -> Reading:
        nv = self.nv
        r = Reading(gpu=str(index))
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            r.celsius = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        except nv.NVMLError_GpuIsLost:
            r.lost = True
            return r
        except nv.NVMLError:
            return r
        for attr, const in (("slowdown_celsius", "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN"),
                            ("shutdown_celsius", "NVML_TEMPERATURE_THRESHOLD_SHUTDOWN")):
            v = self._get(nv.nvmlDeviceGetTemperatureThreshold, h, getattr(nv, const))
            setattr(r, attr, float(v) if v is not None else None)
        p = self._get(nv.nvmlDeviceGetPowerUsage, h)
        r.power_w = p / 1000.0 if p is not None else None
        u = self._get(nv.nvmlDeviceGetUtilizationRates, h)
        r.util_percent = int(u.gpu) if u is not None else None
        m = self._get(nv.nvmlDeviceGetMemoryInfo, h)
        r.mem_used_mib = round(m.used / 2**20, 1) if m is not None else None
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        bits = self._get(reasons_fn, h)
        r.throttle = [name for bit, name in THROTTLE_BITS.items() if bits and bits & bit] if bits else []
        u_id = self._get(nv.nvmlDeviceGetUUID, h)
        r.uuid = _s(u_id) if u_id else None
        return r

    def compute_pids(self) -> set[int]:
        pids: set[int] = set()
        for i in range(self.count):
            try:
                h = self.nv.nvmlDeviceGetHandleByIndex(i)
                pids.update(int(p.pid) for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h))
            except self.nv.NVMLError:
                continue
        return pids

    def utilization_for(self, pids: set[int]) -> int | None:
        """Highest GPU utilisation (%) among devices where one of `pids` runs; None when unknown."""
        best = None
        for i in range(self.count):
            try:
                h = self.nv.nvmlDeviceGetHandleByIndex(i)
                if not {int(p.pid) for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h)} & pids:
                    continue
                u = self.nv.nvmlDeviceGetUtilizationRates(h).gpu
            except self.nv.NVMLError:
                continue
            best = u if best is None else max(best, u)
        return best
