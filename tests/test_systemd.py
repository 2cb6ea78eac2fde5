"""systemd integration: unit files, install-unit, sd_notify on real sockets, journald format, reload."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
import time

import pytest

from conftest import REPO, wait_for
from supervisor.commands import install
from supervisor.integrations import log_setup as logs
from supervisor.integrations.sdnotify import Notifier

ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 3.0  # `systemd-analyze security --offline=true` measured 2.2 ("OK") on systemd 252


def test_units_and_example_exist_once_in_the_repository():
    # supervisor/data only links to systemd/ and config.toml: one copy of each, shipped by the wheel
    for name, real in [*((n, REPO / "systemd" / n) for n in install.UNITS),
                       ("config.example.toml", REPO / "config.toml")]:
        link = install.DATA / name
        assert link.is_symlink() and link.resolve() == real.resolve(), name
        assert not real.is_symlink()


def test_unit_prevents_restart_exactly_for_the_exit_codes_that_say_so():
    from supervisor.core.exit_codes import ExitCode
    want = " ".join(str(int(c)) for c in ExitCode if not c.systemd_restarts)
    for name in install.UNITS:
        text = (REPO / "systemd" / name).read_text()
        assert f"RestartPreventExitStatus={want}\n" in text, name


def test_unit_has_the_required_settings():
    text = (REPO / "systemd" / "cardiacseg-train.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                 "Restart=on-failure", "KillMode=mixed",
                 "OOMPolicy=continue", "StateDirectory=cardiacseg-train", "PrivateDevices=no",
                 "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=char-nvidia-uvm rw",
                 "ProtectProc=default", "TimeoutAbortSec=30s", "SyslogLevel=err"):  # why: tests/test_systemd_real.py
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    stop = int(re.search(r"^TimeoutStopSec=(\d+)min$", text, re.M).group(1)) * 60
    assert stop > 120 + 30  # longer than the default stop.timeout_seconds plus reaping
    assert re.search(r"^WatchdogSec=\d+", text, re.M)


@pytest.fixture
def installed(tmp_path, monkeypatch):
    # what the service user reaches is tests/test_service_user.py's subject: a `cardiacseg` user this machine
    # may have must not decide these tests
    monkeypatch.setattr(install.service_user, "probe", lambda *a, **k: None)
    lines = []
    install.install(tmp_path, create_user=False, out=lines.append)
    return tmp_path, "\n".join(lines)


def test_install_unit_writes_units_and_config_and_prints_next_steps(installed):
    root, out = installed
    unit = (root / "etc/systemd/system/cardiacseg-train.service").read_text()
    assert f"ExecStart={install.executable()} run --config /etc/cardiacseg-train/config.toml" in unit
    assert (root / "etc/cardiacseg-train/config.toml").read_bytes() == (REPO / "config.toml").read_bytes()
    assert "systemctl enable --now cardiacseg-train" in out and "journalctl -fu cardiacseg-train" in out


def test_install_never_overwrites_an_edited_config_and_moves_old_units_aside(installed):
    root, _ = installed
    conf = root / "etc/cardiacseg-train/config.toml"
    conf.write_text("# mine\n")
    unit = root / "etc/systemd/system/cardiacseg-train.service"
    unit.write_text("[Service]\nExecStart=/old\n")
    lines = []
    install.install(root, create_user=False, out=lines.append)
    assert conf.read_text() == "# mine\n"
    assert [p.read_text() for p in unit.parent.glob("cardiacseg-train.service.replaced-*")] == [
        "[Service]\nExecStart=/old\n"]
    install.uninstall(root, out=lines.append)
    assert not unit.exists() and conf.exists()


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name,as_name", [("cardiacseg-train.service", "cardiacseg-train.service"),
                                          ("cardiacseg-train@.service", "cardiacseg-train@gpu0.service")])
def test_systemd_analyze_verify_is_silent_and_security_is_ok(installed, tmp_path, name, as_name):
    root, _ = installed
    d = tmp_path / "verify"
    d.mkdir()
    shutil.copy(root / "etc/systemd/system" / name, d / as_name)
    r = subprocess.run([ANALYZE, "verify", str(d / as_name)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr  # it exits 0 on unknown keys
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(d / as_name)], capture_output=True,
                       text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE


# ---- sd_notify against real datagram sockets ---------------------------------------------------------
class Listener:
    def __init__(self, addr):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(addr)
        self.sock.settimeout(0.05)
        self.msgs = []

    def drain(self):
        while True:
            try:
                self.msgs.append(dict(line.split("=", 1) for line in self.sock.recv(4096).decode().split("\n")))
            except (socket.timeout, BlockingIOError):
                return self.msgs


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_messages_on_path_and_abstract_sockets(tmp_path, abstract):
    name = f"cardiacseg-test-{os.getpid()}-{time.monotonic_ns()}"
    addr, env_addr = (("\0" + name), "@" + name) if abstract else (str(tmp_path / "notify"),) * 2
    lis = Listener(addr)
    t = [100.0]
    n = Notifier({"NOTIFY_SOCKET": env_addr, "WATCHDOG_USEC": "2000000"}, clock=lambda: t[0])
    n.ready("starting")
    n.status("epoch 1")
    n.status("epoch 1")  # unchanged: not sent again
    n.status("epoch 2")
    for step in range(5):  # 5 s at 1 s per ping -> watchdog every 1 s (half of 2 s)
        n.watchdog()
        t[0] += 0.5
        n.watchdog()
        t[0] += 0.5
    before = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
    n.reloading()
    n.stopping()
    n.extend_timeout(90)
    m = lis.drain()
    assert m[0] == {"READY": "1", "STATUS": "starting"}
    assert [x["STATUS"] for x in m if set(x) == {"STATUS"}] == ["epoch 1", "epoch 2"]
    assert sum(1 for x in m if x == {"WATCHDOG": "1"}) == 5
    rel = next(x for x in m if "RELOADING" in x)
    assert abs(int(rel["MONOTONIC_USEC"]) - before) < 5e6
    assert {"STOPPING": "1"} in m and {"EXTEND_TIMEOUT_USEC": "90000000"} in m


def test_notifier_is_silent_without_socket_and_respects_watchdog_pid():
    n = Notifier({})
    assert not n.enabled and not n.send(READY=1)
    n.ready(); n.watchdog(); n.stopping()  # no-ops, no exceptions
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval is None
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"})
    assert gone.send(READY=1) is False  # dropped, never raised


def test_daemon_notifies_ready_status_watchdog_reload_stopping(job, tmp_path):
    lis = Listener(str(tmp_path / "notify.sock"))
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"})
    p = job.start(cfg, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"})
    try:
        wait_for(lambda: any(x.get("STATUS", "").startswith("epoch 3/") for x in lis.drain()), timeout=60,
                 what="STATUS with epoch 3")
        pid = job.state_json()["attempts"][-1]["pid"]
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert not any(e.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for e in environ)
        n0 = sum(1 for x in lis.drain() if "WATCHDOG" in x)
        # pinging goes on (every half of WATCHDOG_USEC; its rate is bench's business, not a timed test's)
        wait_for(lambda: sum(1 for x in lis.drain() if "WATCHDOG" in x) - n0 >= 3, timeout=30,
                 what="three more WATCHDOG=1 pings")
        k = len(lis.drain())
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: any("READY" in x for x in lis.drain()[k:]), timeout=10, what="READY after reload")
        after = lis.drain()[k:]
        i_rel = next(i for i, x in enumerate(after) if "RELOADING" in x)
        i_ready = next(i for i, x in enumerate(after) if "READY" in x)
        assert i_rel < i_ready and int(after[i_rel]["MONOTONIC_USEC"]) > 0
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    m = lis.drain()
    assert m[0].get("READY") == "1"
    assert any("STOPPING" in x for x in m)
    assert p.returncode == 0, out


def test_the_wait_for_a_safe_point_extends_systemds_stop_timeout(job, tmp_path):
    """The target is reached while the checkpoints are written (3 s each here): the stop waits for the safe
    point (STOP_PENDING, up to stop.checkpoint_wait_seconds = 30) and tells systemd that the stop may take
    that wait + stop.timeout_seconds (20) + the reaping: more than the 20 + 60 s a stop already underway
    announces, so a long checkpoint_wait_seconds never runs into TimeoutStopSec."""
    from supervisor.core.criteria import REAP_LIMIT_S
    lis = Listener(str(tmp_path / "notify.sock"))
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_EPOCH_S": "0.1", "FAKE_SAVE_S": "3"},
                     target={"ema_dice": 0.3})
    p = job.start(cfg, extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "new_state=stop_pending" in out
    extends = [int(x["EXTEND_TIMEOUT_USEC"]) / 1e6 for x in lis.drain() if "EXTEND_TIMEOUT_USEC" in x]
    assert extends and max(extends) > 20 + REAP_LIMIT_S + 30, extends


def test_stop_time_left_covers_every_stage_of_a_stop():
    from supervisor.core.criteria import REAP_LIMIT_S, stop_time_left
    from supervisor.core.record import State, Sup
    from test_policy import cfg as make_cfg
    c = make_cfg(stop__timeout_seconds=120)
    assert stop_time_left(Sup(state=State.RUNNING), 0, c) is None
    assert stop_time_left(Sup(state=State.STOP_PENDING, safe_deadline=600), 0, c) == 600 + 120 + REAP_LIMIT_S + 30
    assert stop_time_left(Sup(state=State.STOPPING, stop_deadline=100), 40, c) == 60 + REAP_LIMIT_S + 30
    assert stop_time_left(Sup(state=State.STOPPING, stop_deadline=100), 400, c) == REAP_LIMIT_S + 30


def test_sighup_while_starting_or_tearing_down_never_kills_the_supervisor(job, tmp_path):
    """systemd may send SIGHUP (a reload) at any moment: while the supervisor starts (here: its thermal
    sensor takes 2 s to answer the start-up check) and while it tears down (here: the last notification
    waits for a webhook that never answers). Both are recorded, never fatal; the run ends with exit 0."""
    import socket as _socket
    started = tmp_path / "sensor-started"
    sensor = tmp_path / "sensor.sh"
    sensor.write_text(f'#!/bin/sh\ntouch "{started}"\nsleep 2\necho "0 50"\n')
    sensor.chmod(0o755)
    hold = _socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen(8)  # accepts (the kernel does) and never answers
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_EPOCH_S": "0.1"}, target={"ema_dice": 0.3},
                     thermal={"enabled": True, "source": "command", "command": [str(sensor)], "poll_seconds": 3600},
                     notify={"webhook": f"http://127.0.0.1:{hold.getsockname()[1]}/hook", "events": ["target_reached"],
                             "timeout_seconds": 4, "retries": 0})
    p = job.start(cfg)
    try:
        wait_for(started.exists, timeout=30, interval=0.01, what="the start-up sensor check")
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "outcome=target_reached" in p.log_path.read_text(), timeout=60, interval=0.01,
                 what="the final decision")
        p.send_signal(signal.SIGHUP)  # the last message is still waiting for the silent webhook
        out, _ = p.communicate(timeout=60)
    finally:
        hold.close()
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out[-3000:]
    assert "reloaded" in out and job.state_json()["sup"]["outcome"] == "target_reached"


# ---- reload end to end ---------------------------------------------------------------------------------
def test_reload_lowers_the_target_and_a_broken_file_changes_nothing(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}, target={"ema_dice": 0.95})
    good = cfg.read_text()
    p = job.start(cfg)
    try:
        job.wait_epochs(3, timeout=60)
        cfg.write_text(good.replace("[restart]", "[restart]\nbogus_key = 1"))
        p.send_signal(signal.SIGHUP)
        n = len(job.state_json()["epochs"])
        wait_for(lambda: len(job.state_json()["epochs"]) >= n + 3, timeout=60, what="training goes on")
        assert job.state_json()["sup"]["state"] == "running"
        cfg.unlink()  # deleted while running: same, an error and the old config stays
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "file not found" in p.log_path.read_text(), timeout=10, what="reload error")
        cfg.write_text(good.replace("ema_dice = 0.95", "ema_dice = 0.3"))
        p.send_signal(signal.SIGHUP)
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out
    assert "reload_failed" in out and "restart.bogus_key" in out
    st = job.state_json()
    assert st["sup"]["outcome"] == "target_reached" and len(st["attempts"]) == 1
    assert st["attempts"][0]["reason"] == "target_reached"


def test_reload_reports_keys_that_need_a_restart(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"})
    p = job.start(cfg)
    try:
        job.wait_epochs(1, timeout=60)
        text = cfg.read_text().replace("fold = 0", "fold = 1").replace('"FAKE_EPOCH_S" = "0.2"', "")
        cfg.write_text(text.replace("[environment]", '[environment]\nEXTRA = "1"'))
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_needs_supervisor_restart" in p.log_path.read_text(), timeout=30,
                 what="the reload's answer")
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert re.search(r"reload_needs_supervisor_restart keys=\['training.fold'\]", out), out[-3000:]
    assert re.search(r"reloaded applied=\[\] next_restart=\['\[environment\]'\]", out), out[-3000:]
    assert job.state_json()["job"]["fold"] == 0


# ---- journald format ------------------------------------------------------------------------------------
def test_journal_format_priorities_and_one_line_tracebacks(job, tmp_path):
    cfg = job.config(env={"FAKE_EPOCHS": "4", "FAKE_FAULT": "2:crash"})
    err = tmp_path / "journal.txt"
    with open(err, "w") as fh:
        st = os.fstat(fh.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                           env=env, stderr=fh, stdout=subprocess.DEVNULL, timeout=120)
    assert r.returncode == 0
    lines = err.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>", ln) for ln in lines), lines[:5]
    assert not any(re.match(r"^<\d>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[", ln) for ln in lines)  # no timestamps
    assert not any("\x1b[" in ln for ln in lines)  # no colour
    warn = [ln for ln in lines if ln.startswith("<4>")]
    assert any("attempt_ended" in ln and "reason=crash" in ln for ln in warn)
    assert any(ln.startswith("<6>epoch epoch=") for ln in lines)
    trainer = [ln for ln in lines if "src=trainer" in ln]
    assert trainer and all(ln.startswith("<6>") and "attempt=" in ln for ln in trainer)
    tb = [ln for ln in trainer if "Traceback (most recent call last):" in ln]
    assert len(tb) == 1 and "\\n" in tb[0] and "RuntimeError: CUDA error: an illegal memory access" in tb[0]


def test_journald_detection_needs_matching_inode(tmp_path):
    with open(tmp_path / "x", "w") as fh:
        st = os.fstat(fh.fileno())
        assert logs.under_journald(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.under_journald(fh, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.under_journald(fh, {})


def test_a_built_wheel_ships_the_units_the_example_config_and_the_launcher(tmp_path):
    # editable installs find supervisor/data in the source tree; a real install only has what the wheel has
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import zipfile
    (whl,) = tmp_path.glob("cardiacseg_train-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for n in ("supervisor/data/cardiacseg-train.service", "supervisor/data/cardiacseg-train@.service",
              "supervisor/data/config.example.toml", "supervisor/trainer/launcher.py",
              "supervisor/trainer/demo_trainers/demo_trainers.py"):
        assert n in names, n
    z = zipfile.ZipFile(whl)
    for name in install.UNITS:  # the real contents, not links
        assert z.read(f"supervisor/data/{name}") == (REPO / "systemd" / name).read_bytes()
    assert z.read("supervisor/data/config.example.toml") == (REPO / "config.toml").read_bytes()
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(whl).read(entry).decode()
    assert "cardiacseg-train = supervisor.__main__:entry" in text
    assert "cardiacseg-train-nnunet = supervisor.trainer.launcher:main" in text


def test_a_signal_while_run_is_still_importing_is_recorded_not_fatal(job):
    """SIGHUP, then SIGUSR1, in the first milliseconds of `cardiacseg-train run` (before its imports are
    done): recorded and handled by the loop once it runs (a reload; SIGUSR1 outside SLURM is ignored),
    never the default action that would end the process. The installed command is used, as systemd does."""
    exe = Path(sys.executable).parent / "cardiacseg-train"
    if not exe.exists():
        pytest.skip("the cardiacseg-train command is not installed next to this interpreter")
    cfg = job.config(env={"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.1"})
    p = subprocess.Popen([str(exe), "run", "--config", str(cfg)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)

    def still_importing():
        """The recorder is installed (SigCgt shows HUP and USR1 caught) while the imports are still going
        on (psutil's C module, which the supervisor's modules import, is not loaded yet): without the
        recorder, HUP is caught only once the daemon runs, and this moment never comes."""
        try:
            caught = int(next(ln for ln in open(f"/proc/{p.pid}/status") if ln.startswith("SigCgt")).split()[1], 16)
            maps = open(f"/proc/{p.pid}/maps").read()
        except (OSError, StopIteration):
            return False
        return (caught & (1 << (signal.SIGHUP - 1)) and caught & (1 << (signal.SIGUSR1 - 1))
                and "_psutil_linux" not in maps)
    wait_for(still_importing, timeout=30, interval=0.0005, what="the recorder installed, the imports going on")
    p.send_signal(signal.SIGHUP)
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "reloaded" in out and "signal_ignored signal=SIGUSR1" in out, out[-3000:]
