"""Why is it slow: the verdict from recorded samples (every kind), the adapters that measure them (the
launcher's epoch timer, the sidecar follower, the machine sampler with a fake NVML raising pynvml's real
exceptions), status, check's static findings, and real nnU-Net on the CPU with a slowed data loader."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from conftest import REPO, wait_for
from supervisor.core import diagnose
from supervisor.integrations import profiling
from supervisor.core.diagnose import EpochProfile, verdict
from supervisor.integrations.profiling import MachineSampler, ProfileFollower, make_profile, storage_of
from supervisor.trainer import epoch_timer


# ---- recorded samples: NVML's documented fields, through the sampler, into a verdict -------------------
class FakeNvml:
    """pynvml as the sampler uses it: utilization.gpu (%), memory.used (bytes), the clock-event bitmask."""
    NVMLError = pynvml.NVMLError

    def __init__(self, readings):
        self.readings = list(readings)  # one dict per sample; a value may be an exception to raise
        self.cur = {}

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        self.cur = self.readings.pop(0) if self.readings else self.cur
        return i

    def _v(self, key):
        v = self.cur[key]
        if isinstance(v, Exception):
            raise v
        return v

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._v("util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self._v("mem_used"), total=24 * 2**30, free=0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._v("reasons")


def machine(readings, cpu=None) -> dict:
    """A sampler's epoch summary for these NVML readings (one per sample)."""
    s = MachineSampler(FakeNvml(readings), lambda: (os.getpid(), []), gpus=[0])
    for k in range(len(readings)):
        s.sample(5.0 * k)
    out = s.epoch_summary()
    out.update(cpu or {})
    return out


def line(epoch=3, wait=1.0, step=50.0, val=5.0, epoch_s=60.0, device="cuda:0", cuda=True, workers=12):
    return {"v": 1, "epoch": epoch, "data_wait_s": wait, "step_s": step, "train_s": wait + step, "val_s": val,
            "epoch_s": epoch_s, "device": device, "torch_cuda_available": cuda, "n_proc_da": workers}


GPU_BUSY = [{"util": 97, "mem_used": 9 * 2**30, "reasons": 0x0}] * 4
GPU_WAITING = [{"util": 35, "mem_used": 9 * 2**30, "reasons": 0x1}] * 4  # 0x1: GpuIdle
CPU_16 = {"cores": 16, "cpu_trainer": 1.0, "cpu_machine": 5.0, "iowait_fraction": 0.0}


def test_gpu_bound_is_the_healthy_verdict():
    v = verdict(make_profile(line(), machine(GPU_BUSY, CPU_16)))
    assert v.kind == "gpu_bound" and v.knob is None
    assert v.figures["gpu_util_mean"] == 97.0 and "healthy" in v.text


def test_saturated_workers_with_free_cores_name_n_proc_da_and_the_gain():
    # 4 workers at 1 core each, 16 cores, 5 busy: 58 % of the epoch waiting for batches
    p = make_profile(line(wait=35.0, step=20.0, epoch_s=60.0, workers=4),
                     machine(GPU_WAITING, {**CPU_16, "cpu_workers": 4.0}))
    v = verdict(p)
    assert v.kind == "data_loading"
    assert v.knob == "nnUNet_n_proc_DA=11"  # 4 * 55/20 = 11 needed, 11 free cores allow it
    assert v.figures["data_wait_fraction"] == pytest.approx(35 / 60, abs=1e-3)
    assert "data wait 58 % of the epoch; 4.0 of 16 cores used by 4 workers: try nnUNet_n_proc_DA=11" in v.text
    assert v.gain_estimate == pytest.approx(35 / 60, abs=1e-3)  # 11 workers keep up: the whole wait goes
    few_free = verdict(replace(p, cpu_machine=13.0))  # only 3 cores free: 7 workers, part of the gain
    assert few_free.knob == "nnUNet_n_proc_DA=7" and 0 < few_free.gain_estimate < v.gain_estimate


def test_workers_starved_of_cpu_are_data_loading_without_a_worker_knob():
    p = make_profile(line(wait=30.0, step=25.0, workers=8),
                     machine(GPU_WAITING, {"cores": 8, "cpu_trainer": 1.0, "cpu_workers": 3.0, "cpu_machine": 7.9,
                                           "iowait_fraction": 0.0}))
    v = verdict(p)
    assert v.kind == "data_loading" and "starved of CPU" in v.text and "n_proc_DA" not in (v.knob or "")


def test_idle_workers_and_iowait_are_storage():
    p = make_profile(line(wait=40.0, step=15.0, workers=8),
                     machine(GPU_WAITING, {"cores": 16, "cpu_trainer": 1.0, "cpu_workers": 0.8, "cpu_machine": 2.0,
                                           "iowait_fraction": 0.21}))
    v = verdict(p)
    assert v.kind == "storage" and "local SSD" in v.knob and "I/O 21 % of the time" in v.text


def test_the_cpu_device_and_torch_without_cuda_are_cpu_device():
    v = verdict(make_profile(line(device="cpu", cuda=False), machine([], CPU_16)))
    assert v.kind == "cpu_device" and "device cpu" in v.text
    v = verdict(make_profile(line(device="cuda:0", cuda=False), machine([], CPU_16)))
    assert v.kind == "cpu_device" and "torch sees no CUDA" in v.text


def test_the_measured_data_wait_decides_before_the_device():
    v = verdict(make_profile(line(wait=30.0, step=25.0, device="cpu", cuda=False, workers=1),
                             machine([], {"cores": 2, "cpu_trainer": 1.9, "cpu_workers": 0.05, "cpu_machine": 2.0,
                                          "iowait_fraction": 0.0})))
    assert v.kind == "data_loading" and v.figures["device"] == "cpu" and "computes on the CPU" in v.text


def test_thermal_and_power_clock_event_reasons():
    hot = [{"util": 99, "mem_used": 2**30, "reasons": 0x40}] * 3 + [{"util": 99, "mem_used": 2**30, "reasons": 0}]
    v = verdict(make_profile(line(), machine(hot, CPU_16)))
    assert v.kind == "thermal_throttle" and "3 of 4 samples" in v.text
    capped = [{"util": 99, "mem_used": 2**30, "reasons": 0x4}] * 4
    assert verdict(make_profile(line(), machine(capped, CPU_16))).kind == "power_cap"
    brake = [{"util": 99, "mem_used": 2**30, "reasons": 0x8 | 0x80}] * 4  # HW slowdown from the power brake
    assert verdict(make_profile(line(), machine(brake, CPU_16))).kind == "power_cap"


def test_unknown_without_timings_or_when_the_gpu_idles_without_a_data_wait():
    assert verdict(EpochProfile(epoch=0)).kind == "unknown"
    v = verdict(make_profile(line(wait=0.5, step=20.0, val=35.0), machine(GPU_WAITING, CPU_16)))
    assert v.kind == "unknown" and "validation 35.0 s" in v.text


def test_unsupported_nvml_readings_are_unknown_never_zero():
    ns = pynvml.NVMLError_NotSupported()
    s = machine([{"util": ns, "mem_used": ns, "reasons": ns}] * 3)
    assert s["gpu_util_mean"] is None and s["gpu_mem_mib"] is None and s["clock_event_reasons"] == []
    v = verdict(make_profile(line(), {**s, **CPU_16}))
    assert v.kind == "gpu_bound" and "GPU utilisation unknown" in v.text  # steps fill the epoch


def test_several_epochs_combine_against_the_fixed_thresholds():
    a = make_profile(line(epoch=1, wait=5.0, step=50.0), machine(GPU_BUSY, CPU_16))
    b = make_profile(line(epoch=2, wait=20.0, step=35.0), machine(GPU_BUSY, CPU_16))
    assert verdict([a, b]).figures["data_wait_fraction"] == pytest.approx(25 / 120, abs=1e-3)
    assert diagnose.THRESHOLDS.data_wait_fraction == 0.20  # no config section sets them (none is declared)
    assert verdict(b).kind == "data_loading" and verdict(a).kind == "gpu_bound"


def test_a_warning_once_per_change_to_something_other_than_gpu_bound():
    dl = diagnose.Verdict("data_loading")
    assert diagnose.changed(None, dl) and diagnose.changed("gpu_bound", dl)
    assert not diagnose.changed("data_loading", dl)
    assert not diagnose.changed("data_loading", diagnose.Verdict("gpu_bound"))
    assert diagnose.log_fields(dl)["bottleneck"] == "data_loading"
    rt = diagnose.Verdict.from_json(json.loads(json.dumps(dl.to_json())))
    assert rt == dl
    p = make_profile(line(), machine(GPU_BUSY, CPU_16))
    assert EpochProfile.from_json(json.loads(json.dumps(p.to_json()))) == p


# ---- the adapters ---------------------------------------------------------------------------------------
def test_follower_returns_complete_lines_and_skips_garbage(tmp_path):
    f = tmp_path / "p.jsonl"
    fol = ProfileFollower(f)
    assert fol.poll() == []
    f.write_bytes(b'{"epoch": 0, "data_wait_s": 1}\nnot json\n[1]\n{"no_epoch": 1}\n\xff\xfe\n{"epoch": 1,')
    assert [r["epoch"] for r in fol.poll()] == [0]
    with open(f, "ab") as fh:
        fh.write(b' "x": 2}\n' + b'{"epoch": 9, "pad": "' + b"a" * 70000 + b'"}\n{"epoch": 2}\n')
    assert [r["epoch"] for r in fol.poll()] == [1, 2]  # the over-long line is dropped
    f.write_bytes(b'{"epoch": 5}\n')  # replaced (shorter): read from the start
    assert [r["epoch"] for r in fol.poll()] == [5]


def test_sampler_measures_the_cpu_of_the_trainer_and_its_workers():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        s = MachineSampler(None, lambda: (os.getpid(), [burner.pid]), interval_s=0.0)
        s.sample(0.0)
        wait_for(lambda: psutil.Process(burner.pid).cpu_times().user > 0.3, timeout=30, what="worker CPU")
        assert s.sample(1.0)
        out = s.epoch_summary()
        # the burner used > 0.3 CPU seconds in the 1 s window the caller declared
        assert out["cpu_workers"] > 0.3 and out["processes"] == 1 and out["cores"] == psutil.cpu_count()
        assert out["gpu_util_mean"] is None and out["samples"] == 2
        assert s.epoch_summary()["cpu_workers"] is None  # a new window starts empty
    finally:
        burner.kill()
        burner.wait()


def test_the_sampler_takes_a_reading_only_every_interval():
    s = MachineSampler(None, lambda: (os.getpid(), []), interval_s=5.0)
    assert s.sample(100.0) and not s.sample(104.9) and s.sample(105.0)


class FakeLoader:
    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost

    def __next__(self):
        self.clock.t += self.cost
        return {"data": 1}


class FakeTrainer:
    """nnUNetTrainer's loop and hooks, on a fake clock: 0.5 s per batch waited, 2 s per step."""
    clock = None

    def __init__(self):
        self.current_epoch, self.num_epochs, self.local_rank = 0, 2, 0
        self.finished_with = None

    def on_train_start(self):
        self.dataloader_train = FakeLoader(self.clock, 0.5)
        self.dataloader_val = FakeLoader(self.clock, 0.1)

    def on_epoch_start(self): pass
    def on_train_epoch_start(self): pass
    def on_train_epoch_end(self, outputs): pass
    def on_validation_epoch_start(self): pass
    def on_validation_epoch_end(self, outputs): pass

    def on_epoch_end(self):
        self.clock.t += 1.0  # checkpoints
        self.current_epoch += 1

    def on_train_end(self):
        self.finished_with = type(self.dataloader_train)

    def run_training(self):
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            for _ in range(3):
                next(self.dataloader_train)
                self.clock.t += 2.0
            self.on_train_epoch_end([])
            self.on_validation_epoch_start()
            next(self.dataloader_val)
            self.clock.t += 0.4
            self.on_validation_epoch_end([])
            self.on_epoch_end()
        self.on_train_end()


def test_the_epoch_timer_splits_the_wait_from_the_steps(tmp_path, monkeypatch):
    clock = SimpleNamespace(t=0.0)
    syncs = []
    monkeypatch.setattr(epoch_timer.EpochTimer, "__init__", _timer_init(clock, syncs))
    cls = type("T", (FakeTrainer,), {"clock": clock})
    out = tmp_path / "attempt-0001.profile.jsonl"
    epoch_timer.patch(cls, str(out))
    t = cls()
    t.run_training()
    recs = ProfileFollower(out).poll()
    assert [r["epoch"] for r in recs] == [0, 1]
    r = recs[1]
    assert (r["data_wait_s"], r["step_s"], r["train_s"]) == (1.5, 6.0, 7.5)
    assert (r["val_data_wait_s"], r["val_s"], r["end_s"], r["epoch_s"]) == (0.1, 0.5, 1.0, 9.0)
    assert t.finished_with is FakeLoader  # nnU-Net shuts its augmenters down by their class
    assert len(syncs) >= 3 * 2 + 4  # before each wait, at each phase end


def _timer_init(clock, syncs):
    orig = epoch_timer.EpochTimer.__init__

    def init(self, path, clock_fn=None, sync=None):
        orig(self, path, clock=lambda: clock.t, sync=lambda: syncs.append(clock.t))
    return init


def test_without_the_variable_the_launcher_measures_and_writes_nothing(tmp_path):
    cls = type("T", (FakeTrainer,), {"clock": SimpleNamespace(t=0.0)})
    epoch_timer.patch(cls, None)
    t = cls()
    t.run_training()
    assert type(t.dataloader_train) is FakeLoader and not getattr(cls, "_cardiacseg_timed", False)


def test_a_failed_sidecar_write_never_stops_training(tmp_path, capsys):
    t = epoch_timer.EpochTimer(str(tmp_path / "missing" / "p.jsonl"))
    t.write({"epoch": 0})
    t.write({"epoch": 1})
    assert capsys.readouterr().err.count("epoch profile not written") == 1


# ---- check's static part, status --------------------------------------------------------------------
def test_static_findings_workers_and_filesystems(tmp_path):
    f = diagnose.static_findings
    assert f(12, 16, "cuda", None)[0][0] == "ok"
    assert f(16, 16, "cuda", None)[0] == ("warning", "nnUNet_n_proc_DA=16 with 16 CPU cores: the workers and "
                                                     "the trainer compete for CPU; at most 15 fit")
    assert "inside the training loop" in f(0, 8, "cuda", None)[0][1]
    nfs = {"path": "/data/pre", "mount": "/data", "type": "nfs4", "rotational": None}
    assert f(4, 16, "cuda", nfs)[1][0] == "warning" and "network" in f(4, 16, "cuda", nfs)[1][1]
    hdd = {**nfs, "type": "ext4", "rotational": True}
    assert "spinning" in f(4, 16, "cuda", hdd)[1][1]
    assert f(4, 16, "cuda", {**hdd, "rotational": False})[1] == (
        "ok", "preprocessed data: /data/pre is on ext4 (/data), an SSD")
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    f"40 22 0:50 / {tmp_path}/net\\040share rw - nfs4 srv:/x rw\n")
    (tmp_path / "net share" / "pre").mkdir(parents=True)
    got = storage_of(tmp_path / "net share" / "pre", mountinfo=str(info))
    assert got["type"] == "nfs4" and got["mount"] == f"{tmp_path}/net share"


def test_a_virtual_machines_disk_is_not_called_spinning(tmp_path):
    """virtio-blk says rotational = 1 whatever the host's storage is: no "spinning disk" warning there; a
    real disk's rotational = 1 still warns."""
    import os
    data = tmp_path / "pre"
    data.mkdir()
    dev = os.stat(data).st_dev
    info = tmp_path / "mountinfo"
    info.write_text(f"22 1 {os.major(dev)}:{os.minor(dev)} / {tmp_path} rw - ext4 /dev/x rw\n")
    for where, virtual in (("devices/pci0000:00/0000:00:02.0/virtio1/block/vda", True),
                           ("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda", False)):
        sysfs = tmp_path / f"sys-{virtual}"
        disk = sysfs / where
        (disk / "queue").mkdir(parents=True)
        (disk / "queue" / "rotational").write_text("1\n")
        (sysfs / "dev" / "block").mkdir(parents=True)
        (sysfs / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(disk)
        got = storage_of(data, mountinfo=str(info), sysfs=str(sysfs))
        assert (got["virtual"], got["rotational"]) == ((True, None) if virtual else (False, True))
        level, text = diagnose.static_findings(1, 16, "cuda", got)[1]
        if virtual:
            assert level == "ok" and text.endswith("is on ext4 (" + str(tmp_path) + "), a virtual machine's disk")
        else:
            assert level == "warning" and "a spinning disk" in text


def test_check_findings_for_a_config(job):
    from supervisor.config import loader as config_mod
    cfg = config_mod.load(job.config(env={"nnUNet_n_proc_DA": "64"}))
    found = profiling.check_findings(cfg)
    assert found[0][0] == "warning" and "nnUNet_n_proc_DA=64" in found[0][1]
    assert any("preprocessed data:" in text for _, text in found)


def test_status_shows_the_verdict_from_the_trainer_timings(job):
    from supervisor.config import loader as config_mod
    from supervisor.commands.status import gather, render
    cfg = config_mod.load(job.config())
    assert gather(cfg)["bottleneck"] is None
    (job.state / "attempts").mkdir(parents=True)
    (job.state / "attempts" / "attempt-0001.profile.jsonl").write_text(
        json.dumps(line(epoch=0, wait=2.0, step=3.0, device="cpu", cuda=False)) + "\n"
        + json.dumps(line(epoch=1, wait=30.0, step=20.0, epoch_s=55.0, device="cpu", cuda=False)) + "\n")
    i = gather(cfg)
    assert i["bottleneck"] == "data_loading" and i["data_wait_fraction"] == pytest.approx(30 / 55, abs=1e-3)
    text = render(i)
    assert "bottleneck:   data_loading (epoch 1): data wait 55 % of the epoch" in text
    assert "trainer timings only" in text
    stored = diagnose.Verdict("gpu_bound", {"epoch": 7, "data_wait_fraction": 0.01}, None, None, "GPU 97 % busy")
    from supervisor.config import job as job_mod
    from supervisor.integrations.store import STATE_VERSION
    (job.state / "state.json").write_text(json.dumps({
        "version": STATE_VERSION, "job": job_mod.job_identity(cfg), "sup": {"state": "running"},
        "attempts": [], "changes": [], "epochs": [], "bottleneck": stored.to_json()}))
    i = gather(cfg)
    assert i["bottleneck"] == "gpu_bound" and "GPU 97 % busy" in render(i)


# ---- real nnU-Net on the CPU --------------------------------------------------------------------------
@pytest.mark.e2e
def test_real_nnunet_with_a_slowed_data_loader_is_diagnosed_data_loading(tmp_path):
    """The supervisor runs the launcher (this checkout's, via PYTHONPATH) with the sidecar variable set;
    meanwhile this test samples the trainer's tree as the daemon will. One epoch of 4 iterations whose
    batches take the worker 2 x 3 s more: the loop waits for data most of the epoch."""
    from supervisor.config import loader as config_mod
    from supervisor.commands import demo
    from supervisor.commands.status import gather, render

    demo.make_dataset(tmp_path / "raw")
    demo.preprocess(tmp_path)
    sidecar = tmp_path / "state" / "attempts" / "attempt-0001.profile.jsonl"
    cfg_path = demo.demo_config(tmp_path, trainer="nnUNetTrainerDemoSlowData", target=None, crash_at=None,
                                epochs=1, extra_env={"CARDIACSEG_PROFILE_FILE": str(sidecar),
                                                     "CARDIACSEG_DEMO_ITERS": "4",
                                                     "CARDIACSEG_DEMO_SLOW_DATA_S": "3", "PYTHONPATH": str(REPO)})
    sup = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg_path), "--quiet-trainer"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def tree():
        kids = [p for p in psutil.Process(sup.pid).children() if "launcher" in " ".join(p.cmdline())
                or "nnunet" in " ".join(p.cmdline()).lower()] if sup.poll() is None else []
        if not kids:
            return None, []
        return kids[0].pid, [c.pid for c in kids[0].children(recursive=True)]

    sampler = MachineSampler(None, tree, interval_s=1.0)
    follower = ProfileFollower(sidecar)
    lines, summaries = [], []
    try:
        while sup.poll() is None and not lines:
            sampler.sample(psutil.time.monotonic())
            got = follower.poll()
            if got:
                lines += got
                summaries.append(sampler.epoch_summary())
            try:
                sup.wait(timeout=1.0)  # paces the sampling; returns early when the run ends
            except subprocess.TimeoutExpired:
                pass
        assert sup.wait(timeout=240) == 0
    finally:
        if sup.poll() is None:
            sup.send_signal(signal.SIGTERM)
            sup.wait(timeout=60)
    lines += follower.poll()
    assert lines, "the launcher wrote no profile line"
    rec = lines[0]
    assert rec["epoch"] == 0 and rec["n_proc_da"] == 1 and rec["device"] == "cpu" and len(rec["worker_pids"]) == 1
    assert rec["data_wait_s"] + rec["step_s"] == pytest.approx(rec["train_s"], abs=1e-3)
    cfg = config_mod.load(cfg_path)
    v = verdict(make_profile(rec, summaries[0] if summaries else None, cfg), cfg)
    assert v.kind == "data_loading", (v, rec)
    assert v.figures["device"] == "cpu" and "computes on the CPU" in v.text
    i = gather(cfg)
    assert i["bottleneck"] == "data_loading" and i["data_wait_fraction"] >= 0.2
    print("\n" + render(i) + f"\nwith machine samples: {v.text}")
