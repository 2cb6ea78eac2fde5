"""GPU hardware health (issue 23 item 4) and the workers' memory check (item 2), at the adapter boundary.

No GPU here can report an ECC error or an Xid, so NVML is a fake module with pynvml's real constants,
return types (a (corr, unc, pending, failure) tuple, c_nvmlEventData_t) and exception classes.
"""
import pynvml
import pytest

from supervisor.config.loader import load
from supervisor.core.events import GpuFaults
from supervisor.core.policy import decide
from supervisor.core.record import State
from supervisor.integrations import gpu_health, worker_memory
from supervisor.integrations.nvml import Nvml
from test_policy import cfg, running
from test_thermal import FakeNvml, gpu


class HealthNvml(FakeNvml):
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, gpus, events_error=None):
        super().__init__(gpus)
        self.queued, self.events_error, self.freed, self.last_device = [], events_error, 0, None

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter):
        assert (kind, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        return self._val(h, "ecc")

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h):
        return self._val(h, "pending")

    def nvmlDeviceGetRemappedRows(self, h):
        return self._val(h, "rows")

    def nvmlEventSetCreate(self):
        if self.events_error:
            raise self.events_error
        return object()

    def nvmlDeviceRegisterEvents(self, h, types, es):
        assert types == pynvml.nvmlEventTypeXidCriticalError

    def nvmlEventSetWait_v2(self, es, timeout_ms):
        assert timeout_ms == 0  # never waits in the loop
        if not self.queued:
            raise pynvml.NVMLError_Timeout()
        data = pynvml.c_nvmlEventData_t()  # its device: a handle NVML hands out, read back by nvmlDeviceGetIndex
        (data.eventData, self.last_device) = self.queued.pop(0)
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        return data

    def nvmlDeviceGetIndex(self, device):
        if self.last_device is None:
            raise pynvml.NVMLError_InvalidArgument()
        return self.last_device

    def nvmlEventSetFree(self, es):
        self.freed += 1


def healthy(**kw):
    return gpu(**{"ecc": 0, "pending": pynvml.NVML_FEATURE_DISABLED, "rows": (0, 0, 0, 0), **kw})


def test_new_uncorrectable_errors_are_a_fault_old_ones_a_note():
    fake = HealthNvml([healthy(ecc=3)])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0])
    assert watch.notes() == {"0": "3 uncorrectable ECC errors since the driver loaded"}
    assert watch.poll(0.0) is None  # nothing new since the run began
    fake.gpus[0]["ecc"] = 5
    assert watch.poll(1.0) is None  # polled every POLL_S, not every turn
    ev = watch.poll(gpu_health.POLL_S + 1)
    assert ev == GpuFaults((("0", "2 uncorrectable ECC errors since the run began"),))


def test_pending_retirement_and_remap_failure_are_faults():
    fake = HealthNvml([healthy(), healthy()])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0, 1])
    fake.gpus[0]["pending"] = pynvml.NVML_FEATURE_ENABLED
    fake.gpus[1]["rows"] = (0, 1, 0, 1)
    ev = watch.poll(0.0)
    assert ev.faults == (("0", "a page retirement became pending"), ("1", "a row remap failed"))


def test_hardware_xids_are_faults_application_xids_are_not():
    fake = HealthNvml([healthy(), healthy()])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0, 1])
    # an illegal address, a stopped process: the program's; fell off the bus: the hardware's
    fake.queued = [(13, 0), (43, 0), (79, 1)]
    ev = watch.poll(0.0)
    assert ev.faults == (("1", "Xid 79 (GPU fell off the bus)"),)
    assert watch.poll(gpu_health.POLL_S) is None  # drained


def test_geforce_cards_without_ecc_report_nothing_not_zero():
    ns = pynvml.NVMLError_NotSupported()
    fake = HealthNvml([healthy(ecc=ns, pending=ns, rows=ns)], events_error=pynvml.NVMLError_NotSupported())
    nv = Nvml.open(fake)
    h = gpu_health.read(nv, 0)
    assert (h.ecc_uncorrected, h.retired_pending, h.remap_pending) == (None, None, None)
    watch = gpu_health.GpuHealth(nv, [0])
    assert watch.events is None and watch.poll(0.0) is None
    assert gpu_health.check_findings(nv, [0])[0][1].startswith("GPU 0: no ECC or row-remapper reports")


def test_any_nvml_error_is_unknown_never_a_crash():
    fake = HealthNvml([healthy(ecc=pynvml.NVMLError_Unknown(), rows=pynvml.NVMLError_GpuIsLost())])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0])
    assert watch.poll(0.0) is None
    watch.close()
    assert fake.freed == 1 and watch.events is None


def test_check_names_the_fault_and_the_command_to_see_it():
    nv = Nvml.open(HealthNvml([healthy(ecc=2, pending=pynvml.NVML_FEATURE_ENABLED)]))
    (level, text), = gpu_health.check_findings(nv, [0])
    assert level == "warning" and "2 uncorrectable ECC errors" in text and "page retirement is pending" in text
    assert "nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER" in text


def test_a_fault_polled_by_the_adapter_stops_the_run_through_the_policy():
    fake = HealthNvml([healthy()])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0])
    fake.queued = [(48, None)]  # NVML cannot say which device: with one GPU watched, that one
    c = cfg()
    s, acts = decide(running(c), watch.poll(0.0), 1, c)
    assert s.state == State.STOPPING and s.gpu_faults == {"0": "Xid 48 (double-bit ECC error)"}


# ---- RAM and /dev/shm for the augmentation workers ----------------------------------------------------------
def test_dockers_64_mb_shm_is_a_warning_with_the_fix():
    m = worker_memory.Memory(workers=8, val_workers=4, shm_bytes=64 << 20, available_bytes=64 << 30,
                             batch_bytes=2 * 2 * 128 ** 3 * 4)
    (ram_level, _), (shm_level, shm) = worker_memory.findings(m)
    assert ram_level == "ok" and shm_level == "warning"
    assert "--shm-size" in shm and "0.06 GiB" in shm


def test_too_little_ram_per_worker_says_lower_the_workers():
    m = worker_memory.Memory(workers=12, val_workers=6, shm_bytes=32 << 30, available_bytes=8 << 30,
                             batch_bytes=None)
    (level, text), (shm_level, _) = worker_memory.findings(m)
    assert level == "warning" and "19 processes" in text and "nnUNet_n_proc_DA" in text
    assert shm_level == "ok"


@pytest.mark.parametrize("plans_ok", [True, False])
def test_the_measurement_reads_this_machine_and_the_plans(job, plans_ok):
    if not plans_ok:
        job.plans.write_text("{not json")
    c = load(job.config(env={"nnUNet_n_proc_DA": "4"}), env={})
    m = worker_memory.measure(c)
    assert m.workers == 4 and m.val_workers == 2 and m.available_bytes > 0
    # conftest's plans: batch size 2, patch 48^3, one channel (+ the target)
    assert m.batch_bytes == (2 * 2 * 48 ** 3 * 4 if plans_ok else None)


@pytest.mark.parametrize("conf", [{"batch_size": 0, "patch_size": [48, 48, 48]},
                                  {"batch_size": True, "patch_size": [48, 48, 48]},
                                  {"batch_size": 2, "patch_size": [2 ** 40, 48, 48]},
                                  {"batch_size": 2, "patch_size": ["48", 48, 48]}])
def test_a_hostile_plans_file_gives_no_estimate_not_a_crash(job, conf):
    import json
    doc = json.loads(job.plans.read_text())
    doc["configurations"]["3d_fullres"] = conf
    job.plans.write_text(json.dumps(doc))
    c = load(job.config(), env={})
    assert worker_memory.batch_bytes(c) is None
    assert [lvl for lvl, _ in worker_memory.check_findings(c)]  # RAM and /dev/shm are still reported


def test_the_watched_gpus_are_the_listed_ones_or_cudas_and_a_bad_list_is_named():
    """Nvml.training_gpus: one choice for the thermal guard and the health watch."""
    nv = Nvml.open(HealthNvml([healthy(bus=b"00000000:02:00.0"), healthy(bus=b"00000000:01:00.0")]))
    assert nv.training_gpus(cfg(thermal__gpus=["1"])) == ([1], None)
    idx, why = nv.training_gpus(cfg(thermal__gpus=["0", "7"]))
    assert idx == [] and why == "thermal.gpus: ['7'] are not NVML indices 0..1"
    # not listed: CUDA's numbering (PCI bus order): CUDA device 0 is NVML index 1 here
    assert nv.training_gpus(cfg(environment__CUDA_VISIBLE_DEVICES="0")) == ([1], None)
    assert nv.training_gpus(cfg(environment__CUDA_VISIBLE_DEVICES="5"))[1].startswith("thermal.gpus: CUDA_VISIBLE")
    assert gpu_health.open_for(cfg(training__device="cuda", thermal__gpus=["0", "7"]), nv) is None
    assert gpu_health.open_for(cfg(training__device="cuda", thermal__gpus=["1"]), nv).indices == [1]


def test_a_flood_of_xid_events_is_drained_in_bounded_steps_per_poll():
    fake = HealthNvml([healthy()])
    watch = gpu_health.GpuHealth(Nvml.open(fake), [0])
    fake.queued = [(31, 0)] * 1000 + [(79, 0)]  # a program's Xids flooding, then the hardware's
    polls, t = 0, 0.0
    while True:
        ev = watch.poll(t)
        polls, t = polls + 1, t + gpu_health.POLL_S
        if ev is not None:
            break
    assert len(fake.queued) == 0 and polls == 1000 // 64 + 1  # at most 64 a poll: the loop is never held
    assert ev.faults == (("0", "Xid 79 (GPU fell off the bus)"),)
