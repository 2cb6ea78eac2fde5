"""The NVML adapter: the only module that talks to pynvml (from the nvidia-ml-py distribution).

How it works: `Nvml.open()` initialises NVML and returns an adapter, or None when there is no library or
driver (NVMLError_LibraryNotFound / DriverNotLoaded): NVML is optional and never crashes the loop.
Every query catches pynvml.NVMLError and degrades to "unknown" (an empty answer), never to 0. Tests
replace the `pynvml` module object the adapter holds with a fake that raises the real exception classes.

Used before a restart after an OOM: `compute_pids()` lists the processes that hold GPU memory, so the
supervisor can wait until none of the previous attempt's processes do (nnU-Net issue #2814). Note that
inside a container NVML may report host pids, which then never match ours: the wait then ends at once.
"""
from __future__ import annotations


class Nvml:
    def __init__(self, nvml_module):
        self.nv = nvml_module
        self.count = nvml_module.nvmlDeviceGetCount()

    @classmethod
    def open(cls, module=None) -> "Nvml | None":
        try:
            if module is None:
                import pynvml as module
        except ImportError:
            return None
        try:
            module.nvmlInit()
            return cls(module)
        except module.NVMLError:
            return None

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except self.nv.NVMLError:
            pass

    def compute_pids(self) -> set[int]:
        pids: set[int] = set()
        for i in range(self.count):
            try:
                h = self.nv.nvmlDeviceGetHandleByIndex(i)
                for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h):
                    pids.add(int(p.pid))
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
