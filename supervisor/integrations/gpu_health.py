"""GPU hardware health from NVML: uncorrectable ECC errors, page retirement, row remapping, Xid events.

How it works
- `read(nvml, index)` measures one GPU: the volatile uncorrectable ECC count (since the driver loaded), a
  page retirement pending (needs a GPU reset), and the row remapper's state (uncorrectable remaps, a remap
  pending, a remap failure; Ampere and newer). A query NVML does not support (GeForce cards have no ECC)
  is None, "not reported", never 0; any other NVMLError is None too: health never crashes the loop.
- `GpuHealth.open(nvml, indices)` takes the first reading as the baseline and registers an event set for
  Xid events. `notes()` says what was already wrong at start (logged at start-up and shown by `check`:
  counts since the driver loaded may be old news, so they are not a reason to stop a run by themselves).
- `poll(now)` runs every POLL_S from the main loop: it reads again and drains the event set without
  waiting (timeout 0 ms), and returns a GpuFaults event with what is NEW since the baseline: more
  uncorrectable ECC errors, a retirement or remap that became pending or failed, a hardware Xid. The
  policy decides what follows (core/rules_remedy.py: stop at the safe point, GPU unhealthy).
- Xids: HARDWARE_XIDS are the ones NVIDIA's Xid catalogue attributes to the hardware or the driver's
  view of it (ECC, page retirement, row remapping, fell off the bus, NVLink, GSP); others (13, 31, 43,
  45: an illegal memory access, a killed process) are the program's and only logged.
- Tests replace the pynvml module object with a fake raising pynvml's real exception classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from supervisor.core.events import GpuFaults

POLL_S = 30.0
# Xid -> what it means (NVIDIA's "Xid Errors" catalogue): hardware faults that end a GPU's usefulness
HARDWARE_XIDS = {48: "double-bit ECC error", 63: "ECC page retirement or row remap recorded",
                 64: "ECC page retirement or row remap failed", 74: "NVLink error", 79: "GPU fell off the bus",
                 92: "high single-bit ECC error rate", 94: "contained ECC error", 95: "uncontained ECC error",
                 119: "GSP RPC timeout", 120: "GSP error"}


@dataclass(frozen=True)
class Health:
    gpu: str
    ecc_uncorrected: int | None = None     # volatile: since the driver loaded
    retired_pending: bool | None = None
    remapped_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None

    def problems(self) -> list[str]:
        out = []
        if self.ecc_uncorrected:
            out.append(f"{self.ecc_uncorrected} uncorrectable ECC errors since the driver loaded")
        if self.retired_pending:
            out.append("a page retirement is pending (needs a GPU reset)")
        if self.remap_failed:
            out.append("a row remap failed")
        elif self.remap_pending:
            out.append("a row remap is pending (needs a GPU reset)")
        return out


def read(nvml, index: int) -> Health:
    nv = nvml.nv
    try:
        h = nv.nvmlDeviceGetHandleByIndex(index)
    except nv.NVMLError:
        return Health(str(index))

    def get(fn, *args):
        try:
            return fn(h, *args)
        except nv.NVMLError:  # NotSupported on consumer GPUs, anything else: not reported
            return None

    ecc = get(nv.nvmlDeviceGetTotalEccErrors, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
    pending = get(nv.nvmlDeviceGetRetiredPagesPendingStatus)
    rows = get(nv.nvmlDeviceGetRemappedRows)
    _corr, unc, rpend, rfail = rows if isinstance(rows, tuple) and len(rows) == 4 else (None,) * 4
    return Health(str(index), ecc_uncorrected=int(ecc) if ecc is not None else None,
                  retired_pending=None if pending is None else pending == nv.NVML_FEATURE_ENABLED,
                  remapped_uncorrectable=unc, remap_pending=None if rpend is None else bool(rpend),
                  remap_failed=None if rfail is None else bool(rfail))


def new_faults(before: Health, now: Health) -> list[str]:
    """What went wrong between two readings of one GPU."""
    out = []
    if now.ecc_uncorrected is not None and now.ecc_uncorrected > (before.ecc_uncorrected or 0):
        out.append(f"{now.ecc_uncorrected - (before.ecc_uncorrected or 0)} uncorrectable ECC errors since the "
                   "run began")
    if now.retired_pending and not before.retired_pending:
        out.append("a page retirement became pending")
    if now.remap_failed and not before.remap_failed:
        out.append("a row remap failed")
    elif now.remap_pending and not before.remap_pending:
        out.append("a row remap became pending")
    return out


class GpuHealth:
    def __init__(self, nvml, indices: list[int]):
        self.nvml, self.indices = nvml, indices
        self.baseline = {i: read(nvml, i) for i in indices}
        self.next = 0.0
        self.events = None
        nv = nvml.nv
        try:
            self.events = nv.nvmlEventSetCreate()
            for i in indices:
                nv.nvmlDeviceRegisterEvents(nv.nvmlDeviceGetHandleByIndex(i), nv.nvmlEventTypeXidCriticalError,
                                            self.events)
        except nv.NVMLError:
            self.close()  # no Xid events here (NotSupported, no permission): the counters still work

    def notes(self) -> dict[str, str]:
        """GPU -> what was already wrong when the run began."""
        return {str(i): "; ".join(p) for i, h in self.baseline.items() if (p := h.problems())}

    def _xids(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.events is None:
            return out
        nv = self.nvml.nv
        for _ in range(64):  # drain what is queued, bounded
            try:
                data = nv.nvmlEventSetWait_v2(self.events, 0)
            except nv.NVMLError:  # NVMLError_Timeout: nothing (more) queued
                break
            xid = int(data.eventData)
            if xid not in HARDWARE_XIDS:
                continue
            try:
                gpu = str(nv.nvmlDeviceGetIndex(data.device))
            except nv.NVMLError:
                gpu = str(self.indices[0]) if len(self.indices) == 1 else "?"
            out.setdefault(gpu, []).append(f"Xid {xid} ({HARDWARE_XIDS[xid]})")
        return out

    def poll(self, now: float) -> GpuFaults | None:
        if now < self.next:
            return None
        self.next = now + POLL_S
        found = self._xids()
        for i in self.indices:
            found.setdefault(str(i), []).extend(new_faults(self.baseline[i], read(self.nvml, i)))
        faults = tuple((g, "; ".join(what)) for g, what in sorted(found.items()) if what)
        return GpuFaults(faults) if faults else None

    def close(self) -> None:
        if self.events is not None:
            try:
                self.nvml.nv.nvmlEventSetFree(self.events)
            except self.nvml.nv.NVMLError:
                pass
            self.events = None


def check_findings(nvml, indices: list[int]) -> list[tuple[str, str]]:
    """`check`'s lines: each GPU's health now (what is not reported says so)."""
    out = []
    for i in indices:
        h = read(nvml, i)
        if h.problems():
            out.append(("warning", f"GPU {i}: " + "; ".join(h.problems()) + " (nvidia-smi -q -d "
                        "ECC,PAGE_RETIREMENT,ROW_REMAPPER; a run stops at its safe point if more appear)"))
        elif h.ecc_uncorrected is None and h.remap_pending is None:
            out.append(("ok", f"GPU {i}: no ECC or row-remapper reports (not supported by this GPU); Xid "
                              "events are watched"))
        else:
            out.append(("ok", f"GPU {i}: no uncorrectable ECC errors, no pending retirement or remap"))
    return out


def open_for(cfg, nvml) -> GpuHealth | None:
    """The health watch of the GPUs the training uses (the thermal guard's: Nvml.training_gpus), or None
    without NVML, off CUDA, or when they cannot be told (the thermal guard, if on, says why)."""
    if nvml is None or cfg.training.device != "cuda":
        return None
    idx, why = nvml.training_gpus(cfg)
    return GpuHealth(nvml, idx) if not why else None


def config_findings(cfg) -> list[tuple[str, str]]:
    """`check`: the health of the GPUs a cuda run uses, read now."""
    from supervisor.integrations.nvml import Nvml

    if cfg.training.device != "cuda":
        return []
    nvml = Nvml.open()
    if nvml is None:
        return [("warning", f"GPU health: NVML is not available ({Nvml.open_error()}): uncorrectable ECC "
                            "errors and Xid events cannot be watched during the run")]
    watch = None
    try:
        watch = open_for(cfg, nvml)
        return check_findings(nvml, watch.indices) if watch is not None else []
    finally:
        if watch is not None:
            watch.close()
        nvml.close()
