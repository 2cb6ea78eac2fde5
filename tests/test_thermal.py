"""Thermal guard: the pure verdict, the NVML adapter (fake at the boundary), and end to end with a
sensor command fed from a file: paused (process state really 'T'), resumed, stopped and restarted."""
import json
import os
import signal
import sys
from types import SimpleNamespace

import psutil
import pynvml
import pytest

from conftest import wait_for
from supervisor.integrations.nvml import Nvml
from supervisor.core.events import Readings
from supervisor.core.criteria import thermal_verdict
from supervisor.integrations.thermal import parse_command_output
from test_policy import cfg as make_cfg


def cfg(**kw):
    return make_cfg(**{"thermal__pause_celsius": 85, "thermal__resume_celsius": 75, "thermal__stop_celsius": 92,
                       "thermal__max_pause_minutes": 10, "thermal__max_failed_reads": 3, **kw})


def R(*temps):
    return {str(i): t for i, t in enumerate(temps)}


def V(state, temps, now, c, paused_at, failed, lost=False):
    return thermal_verdict(state, temps, lost, now, c, paused_at, failed)


def test_verdict_hysteresis_stop_and_unknowns():
    c = cfg()
    assert V("running", R(84, 85), 0, c, None, 0) is None          # at the limit is fine
    assert V("running", R(70, 86), 0, c, None, 0) == "pause"       # any GPU above it
    assert V("running", R(70, 86), 0, cfg(training__num_gpus=2), None, 0) == "stop_hot"  # NCCL would time out
    assert V("paused", R(80, 74), 10, c, 0, 0) is None             # hysteresis: 80 > 75
    assert V("paused", R(75, 74), 10, c, 0, 0) == "resume"
    assert V("paused", R(None, 60), 10, c, 0, 1) is None           # unknown never resumes
    assert V("paused", R(80), 601, c, 0, 0) == "stop_pause"
    assert V("running", R(92), 0, c, None, 0) == "stop_hot"
    assert V("paused", R(93), 0, c, 0, 0) == "stop_hot"
    assert V("running", R(None), 0, c, None, 3) == "stop_sensor"
    assert V("cooling", R(76), 0, c, None, 0) is None
    assert V("cooling", R(None), 0, c, None, 1) is None
    assert V("cooling", R(75), 0, c, None, 0) == "cooled"
    assert V("backoff", R(99), 0, c, None, 0) is None
    assert V("running", {"0": None}, 0, c, None, 1, lost=True) == "gpu_lost"


def T(*temps):
    return Readings(temps=tuple((str(i), t) for i, t in enumerate(temps)))


def test_policy_pause_resume_stop_and_restart_when_cool():
    from supervisor.core.classify import Exit
    from supervisor.core.events import ChildExited, EpochDone, EpochStarted, Start
    from supervisor.core.actions import SignalGroup, InspectCheckpoints
    from supervisor.core.training_log import EpochRecord
    from supervisor.core.policy import decide
    from supervisor.core.record import State, Sup

    c = cfg()
    s, _ = decide(Sup(), Start(), 0, c)
    s, a = decide(s, T(88), 10, c)
    assert s.state == State.PAUSED and SignalGroup(signal.SIGSTOP) in a
    s, a = decide(s, T(70), 70, c)
    assert s.state == State.RUNNING and SignalGroup(signal.SIGCONT) in a and s.paused_total == 60
    s, _ = decide(s, T(88), 100, c)
    s, a = decide(s, T(95), 110, c)
    assert [x.sig for x in a if isinstance(x, SignalGroup)] == [signal.SIGCONT, signal.SIGINT]
    s, a = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt")), 115, c)
    assert s.state == State.COOLING and s.last_reason.value == "thermal_stop"
    s, a = decide(s, T(70), 300, c)
    assert s.state == State.RUNNING and InspectCheckpoints() in a and s.restart_times == ()  # not counted
    # hot right after an epoch's last line: the stop waits for the checkpoint write (bounded)
    s, _ = decide(s, EpochDone(EpochRecord(epoch=3, dice=[0.5])), 310, c)
    s, a = decide(s, T(95), 311, c)
    assert s.state == State.STOP_PENDING and not [x for x in a if isinstance(x, SignalGroup)]
    s, a = decide(s, EpochStarted(4), 315, c)
    assert s.state == State.STOPPING and SignalGroup(signal.SIGINT) in a


def test_reloaded_thermal_limits_apply_at_once():
    """Regression: after lowering pause_celsius from 86 to 80 by reload, 83 C did not pause."""
    from supervisor.core.events import Start
    from supervisor.core.policy import decide
    from supervisor.core.record import State, Sup
    from supervisor.config.reload import plan_reload

    old = make_cfg(thermal__pause_celsius=86, thermal__resume_celsius=78, thermal__stop_celsius=91)
    new = plan_reload(old, make_cfg(thermal__pause_celsius=80, thermal__resume_celsius=70,
                                    thermal__stop_celsius=91)).config
    s, _ = decide(Sup(), Start(), 0, old)
    s1, _ = decide(s, T(83), 1, old)
    assert s1.state == State.RUNNING
    s2, _ = decide(s, T(83), 1, new)
    assert s2.state == State.PAUSED


def test_parse_command_output():
    r, err = parse_command_output("0 71\n1 88.5\n\n", None)
    assert err is None and [(x.gpu, x.celsius) for x in r] == [("0", 71.0), ("1", 88.5)]
    r, err = parse_command_output("0 71\n", ["0", "1"])
    assert err is None and r[1].celsius is None  # a watched GPU missing: unknown
    assert parse_command_output("GPU0: 71C\n", None)[1].startswith("unexpected line")
    assert parse_command_output("", None)[1] == "no readings"


# ---- NVML adapter, with a fake module at the boundary that raises the real pynvml exceptions ----------
class FakeNvml:
    """Only the entry points the adapter uses; errors are pynvml's own classes."""
    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN

    def __init__(self, gpus, init_error=None):
        self.gpus, self.init_error = gpus, init_error

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def _val(self, h, key):
        v = h.get(key)
        if isinstance(v, Exception):
            raise v
        return v

    def nvmlDeviceGetTemperature(self, h, _):
        return self._val(h, "temp")

    def nvmlDeviceGetTemperatureThreshold(self, h, kind):
        return self._val(h, "slow" if kind == pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN else "shut")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._val(h, "mw")

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._val(h, "util"))

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self._val(h, "used"))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._val(h, "reasons")

    def nvmlDeviceGetUUID(self, h):
        return self._val(h, "uuid")

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self._val(h, "bus"))

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=p) for p in self._val(h, "pids")]


def gpu(**kw):
    base = {"temp": 70, "slow": 87, "shut": 95, "mw": 350000, "util": 98, "used": 20 * 2**30,
            "reasons": 0x20 | 0x4, "uuid": "GPU-aaaa", "bus": b"00000000:01:00.0", "pids": []}
    return {**base, **kw}


def test_adapter_reads_metrics_and_treats_not_supported_as_unknown():
    nv = Nvml.open(FakeNvml([gpu(slow=pynvml.NVMLError_NotSupported(), mw=pynvml.NVMLError_NotSupported())]))
    r = nv.read(0)
    assert (r.celsius, r.shutdown_celsius, r.util_percent, r.mem_used_mib) == (70.0, 95.0, 98, 20480.0)
    assert r.slowdown_celsius is None and r.power_w is None  # unknown, never 0
    assert r.throttle == ["sw_power_cap", "sw_thermal"] and not r.lost


def test_adapter_reports_a_lost_gpu_and_open_failures():
    nv = Nvml.open(FakeNvml([gpu(temp=pynvml.NVMLError_GpuIsLost())]))
    assert nv.read(0).lost
    assert Nvml.open(FakeNvml([], init_error=pynvml.NVMLError_DriverNotLoaded())) is None
    assert "DriverNotLoaded" in Nvml.open_error()
    nv = Nvml.open(FakeNvml([gpu(temp=pynvml.NVMLError_Unknown())]))
    assert nv.read(0).celsius is None and not nv.read(0).lost


def test_select_maps_cuda_visible_devices_by_uuid_and_pci_order():
    # NVML order differs from PCI bus order here
    nv = Nvml.open(FakeNvml([gpu(uuid="GPU-bbbb", bus=b"00000000:41:00.0"),
                             gpu(uuid="GPU-aaaa", bus=b"00000000:01:00.0")]))
    assert nv.select(None) == ([1], None)                 # CUDA device 0 = lowest bus id
    assert nv.select("1") == ([0], None)
    assert nv.select("GPU-bbbb") == ([0], None)
    assert nv.select("0,1", num_gpus=2) == ([1, 0], None)
    assert nv.select("7")[1].startswith("CUDA_VISIBLE_DEVICES names GPU 7")
    assert "neither an index" in nv.select("foo")[1]


def test_thermal_enabled_without_nvml_is_a_startup_error(job):
    if Nvml.open() is not None:
        pytest.skip("this machine has a working NVML")
    rc, out = job.run(job.config(thermal={"enabled": True}))
    assert rc == 2 and "thermal.enabled: NVML is not available" in out and "Traceback" not in out


@pytest.mark.parametrize("command,needle", [
    (["/nonexistent/sensor"], "cannot run /nonexistent/sensor"),
    ([sys.executable, "-c", "print('GPU0: 71C')"], "unexpected line"),
    ([sys.executable, "-c", "import time; time.sleep(30)"], "did not answer within 1 s"),
])
def test_bad_sensor_command_is_a_startup_error(job, command, needle):
    rc, out = job.run(job.config(thermal={"enabled": True, "source": "command", "command": command,
                                          "command_timeout_seconds": 1}), timeout=60)
    assert rc == 2 and needle in out and "Traceback" not in out


def test_config_rejects_bad_limits(tmp_path):
    from supervisor.config.loader import ConfigError, load
    p = tmp_path / "c.toml"
    p.write_text('[training]\ndataset="D"\n[paths]\npreprocessed="p"\nresults="r"\n'
                 '[thermal]\npause_celsius=80\nresume_celsius=80\nstop_celsius=79\npoll_seconds=0\n')
    with pytest.raises(ConfigError) as e:
        load(p, env={})
    m = str(e.value)
    assert "thermal.resume_celsius: expected lower than" in m and "thermal.poll_seconds: expected a finite number > 0" in m
    assert "thermal.pause_celsius: expected lower than thermal.stop_celsius" in m


# ---- end to end: fake trainer + a sensor command reading a file the test rewrites ------------------
def thermal_job(job, temp_file, **extra):
    temp_file.write_text("0 60\n")
    return job.config(env={"FAKE_EPOCHS": "400", "FAKE_EPOCH_S": "0.2"},
                      thermal={"enabled": True, "source": "command", "poll_seconds": 0.3,
                               "command": ["/bin/cat", str(temp_file)], "pause_celsius": 85,
                               "resume_celsius": 75, "stop_celsius": 92, **extra})


def wait_polls(job, n, timeout=30):
    """Wait until the thermal guard has read the sensor n more times (thermal.json's "at" moved n times): an
    event that proves time passed with the supervisor watching, instead of a sleep."""
    seen = set()

    def more():
        try:
            seen.add(json.loads((job.state / "thermal.json").read_text())["at"])
        except (OSError, ValueError, KeyError):
            pass
        return len(seen) > n
    wait_for(more, timeout=timeout, interval=0.02, what=f"{n} more thermal polls")


def group_states(pgid):
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p.status())
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def test_heat_pauses_the_whole_group_cool_resumes(job, tmp_path):
    temp = tmp_path / "temps"
    p = job.start(thermal_job(job, temp))
    try:
        job.wait_epochs(2, timeout=60)
        pgid = job.state_json()["attempts"][-1]["pgid"]
        temp.write_text("0 88\n")
        wait_for(lambda: (s := group_states(pgid)) and len(s) >= 2 and all(x == psutil.STATUS_STOPPED for x in s),
                 timeout=10, what="every process of the group stopped ('T')")
        n = len(job.state_json()["epochs"])
        wait_polls(job, 5)                            # 5 x 0.3 s of readings: 0.2 s epochs would have gone on
        assert len(job.state_json()["epochs"]) == n  # really not training
        assert job.state_json()["sup"]["state"] == "paused"
        temp.write_text("0 80\n")  # below pause, above resume: stays paused (hysteresis)
        wait_polls(job, 3)
        assert all(x == psutil.STATUS_STOPPED for x in group_states(pgid))
        temp.write_text("0 70\n")
        wait_for(lambda: len(job.state_json()["epochs"]) > n, timeout=15, what="training resumed")
        assert job.state_json()["sup"]["paused_total"] > 2
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "thermal_pause" in out and "thermal_resume" in out
    assert len(job.state_json()["attempts"]) == 1


def test_overheat_stops_gracefully_then_restarts_when_cool(job, tmp_path):
    temp = tmp_path / "temps"
    p = job.start(thermal_job(job, temp))
    try:
        job.wait_epochs(2, timeout=60)
        temp.write_text("0 95\n")
        wait_for(lambda: job.state_json()["sup"]["state"] == "cooling", timeout=30, what="cooling")
        a = job.state_json()["attempts"][0]
        assert a["reason"] == "thermal_stop" and a["exit_code"] == -signal.SIGINT
        wait_polls(job, 3)
        assert job.state_json()["sup"]["state"] == "cooling"  # 95 C: no restart yet
        temp.write_text("0 74\n")
        wait_for(lambda: len(job.state_json()["attempts"]) == 2 and job.state_json()["sup"]["state"] == "running",
                 timeout=30, what="restart after cooling")
        st = job.state_json()
        assert "--c" in st["attempts"][1]["argv"] and st["sup"]["restart_times"] == []
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out


def test_long_pause_becomes_a_graceful_stop_and_sigterm_while_paused_works(job, tmp_path):
    temp = tmp_path / "temps"
    p = job.start(thermal_job(job, temp, max_pause_minutes=0.05))
    try:
        job.wait_epochs(1, timeout=60)
        temp.write_text("0 88\n")
        wait_for(lambda: job.state_json()["attempts"][0]["reason"] == "thermal_stop", timeout=30,
                 what="stop after the longest pause")
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and job.state_json()["sup"]["outcome"] == "stopped", out


def test_a_supervisor_restarted_while_cooling_keeps_waiting_for_the_gpu():
    from supervisor.core.events import Start
    from supervisor.core.actions import InspectCheckpoints
    from supervisor.core.policy import decide
    from supervisor.core.record import State, Sup

    c = cfg(thermal__enabled=True)
    s, acts = decide(Sup(state=State.COOLING), Start(), 0, c)
    assert s.state == State.COOLING and InspectCheckpoints() not in acts
    s, acts = decide(s, T(60), 5, c)
    assert s.state == State.RUNNING and InspectCheckpoints() in acts


def test_cooling_with_a_lost_sensor_gives_up_after_max_pause_minutes():
    """After a thermal stop the sensor stops answering: the run cannot know the GPU is cool. It waits
    thermal.max_pause_minutes from the last complete reading (a reading in between restarts the wait),
    then gives up (exit 3) naming the sensor, instead of waiting forever."""
    from supervisor.core.classify import Exit
    from supervisor.core.events import ChildExited, Start
    from supervisor.core.exit_codes import ExitCode
    from supervisor.core.policy import decide
    from supervisor.core.record import State, Sup

    c = cfg()  # max_pause_minutes 10
    s, _ = decide(Sup(), Start(), 0, c)
    s, _ = decide(s, T(95), 10, c)
    s, _ = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt")), 15, c)
    assert s.state == State.COOLING
    lost = Readings(temps=(("0", None),), error="nvidia-smi did not answer within 5 s")
    s, _ = decide(s, lost, 300, c)
    s, _ = decide(s, T(80), 500, c)                      # known but still hot: the wait starts again
    s, _ = decide(s, lost, 500 + 599, c)
    assert s.state == State.COOLING
    s, acts = decide(s, lost, 500 + 600, c)
    assert s.state == State.FAILED and s.exit_code == ExitCode.GAVE_UP
    assert "nvidia-smi did not answer" in s.message and "max_pause_minutes" in s.message
    # a supervisor restarted while cooling gives the (maybe replaced) sensor a full wait again
    s, _ = decide(Sup(state=State.COOLING, cool_deadline=1.0), Start(), 1000, cfg(thermal__enabled=True))
    s, _ = decide(s, lost, 1001, c)
    assert s.state == State.COOLING


def test_reloaded_poll_pace_and_sensor_timeout_are_in_force(job, tmp_path):
    """thermal.poll_seconds and command_timeout_seconds are declared live: after SIGHUP the sensor is
    read at the new pace (it was 1 h: never again), and a sensor slower than the new timeout is a failed
    read. Each poll of the sensor command appends a line to a counter file: an event, not a sleep."""
    from supervisor.config.loader import reload_kind, LIVE
    assert reload_kind("thermal.poll_seconds") == reload_kind("thermal.command_timeout_seconds") == LIVE
    temp, count = tmp_path / "temps", tmp_path / "polls"
    temp.write_text("0 60\n")
    sensor = tmp_path / "sensor.sh"
    sensor.write_text(f'#!/bin/sh\necho x >> "{count}"\nif [ -e "{tmp_path}/slow" ]; then sleep 3; fi\ncat "{temp}"\n')
    sensor.chmod(0o755)
    cfg = thermal_job(job, temp, poll_seconds=3600, command=[str(sensor)], max_failed_reads=1000)
    p = job.start(cfg)
    try:
        job.wait_epochs(2, timeout=60)
        polls = len(count.read_text().splitlines())  # the start-up check and the first poll
        text = cfg.read_text().replace("poll_seconds = 3600", "poll_seconds = 0.2")
        assert text != cfg.read_text()
        cfg.write_text(text)
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: len(count.read_text().splitlines()) >= polls + 5, timeout=30, what="5 polls at the new pace")
        (tmp_path / "slow").touch()
        cfg.write_text(cfg.read_text().replace("[thermal]", "[thermal]\ncommand_timeout_seconds = 0.5"))
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "sensor_read_failed" in p.log_path.read_text(), timeout=30,
                 what="a read cut at the new timeout")
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out[-3000:]
    assert "did not answer within 0.5 s" in out


def test_a_poll_is_not_fsynced_and_a_temperature_change_is_not_a_state_save(tmp_path, monkeypatch):
    """thermal.json is rewritten every poll (every 2 s, for days): atomically, but never fsynced; and a
    change of temperature alone does not make state.json durable-dirty."""
    import time as _time
    from supervisor.core.record import Sup
    from supervisor.integrations.thermal import CommandSource, ThermalGuard

    temp = tmp_path / "temps"
    temp.write_text("0 70\n")
    guard = ThermalGuard(cfg(), CommandSource(["/bin/cat", str(temp)], 5, 0.0, None),
                         SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None))
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    got = []
    for t in range(3):
        temp.write_text(f"0 {70 + t}\n")
        wait_for(lambda: (r := guard.poll(_time.monotonic(), tmp_path)) is not None and got.append(r) is None,
                 timeout=10, interval=0.01, what="a reading")
    guard.close()
    assert [r.temps for r in got] == [(("0", 70.0),), (("0", 71.0),), (("0", 72.0),)]
    assert json.loads((tmp_path / "thermal.json").read_text())["readings"][0]["celsius"] == 72.0
    assert synced == []
    assert not Sup(temps={"0": 72.0}, failed_reads=2).durably_differs(Sup(temps={"0": 70.0}))
