"""The service under a real systemd (issue 24): `systemctl start`, `journalctl -fu`, reload, stop, crashes.

systemd 252 runs as PID 1 of its own namespaces (tests/systemd_ns.py, scripts/systemd-ci.sh; started by
.ci/run as root, or here); the project is installed in it as the README says (a venv from the system's
Python at /opt/cardiacseg-train, `install-unit`, the user `cardiacseg`, configs in /etc/cardiacseg-train,
edited in place as sudoedit does) and used as a person would: systemctl, journalctl, runuser. The trainer
is tests/fake_trainer.py installed as /opt/data/bin/nnUNetv2_train (real torch checkpoints), and in the
last test real nnU-Net. The tests' only change to the units is RestartSec=1s (a drop-in); the watchdog
test also shortens WatchdogSec and TimeoutAbortSec in its own drop-in. Output worth quoting (systemctl
status, a journal excerpt) is printed: `pytest -s tests/test_systemd_real.py`.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import DATASET, Job, toml_value, wait_for
from supervisor.integrations.checkpoints import verify
from supervisor.integrations.store import StateStore
from systemd_ns import TRAINER, VENV, Systemd, Unavailable, install_service, why_not

UNIT = "cardiacseg-train"
CONF = "/etc/cardiacseg-train/config.toml"
STATE = "/var/lib/cardiacseg-train"


@pytest.fixture(scope="module")
def sd():
    given = os.environ.get("CARDIACSEG_SYSTEMD_DIR")
    if given:
        try:
            box = Systemd.attach(Path(given))
        except (OSError, ValueError) as e:
            pytest.skip(f"the systemd .ci/run started is gone ({e})")
    else:
        if os.environ.get("CARDIACSEG_SYSTEMD_SKIP"):
            pytest.skip(f"systemd tests skipped: {os.environ['CARDIACSEG_SYSTEMD_SKIP']}")
        reason = why_not()
        if reason:
            pytest.skip(f"systemd tests skipped: {reason}")
        try:
            box = Systemd.boot(Path(tempfile.mkdtemp(prefix="cardiacseg-systemd-")))
        except Unavailable as e:
            pytest.skip(str(e))
    t0 = time.monotonic()
    box.install_output = install_service(box)
    print(f"\n[systemd] booted and installed in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    # real nnU-Net's data, prepared on this side while the fake trainer's tests run
    box.nn = box.scratch / "opt" / "nn"
    box.prep = subprocess.Popen([sys.executable, "-c", "import sys; from pathlib import Path; "
                                 "from supervisor.commands import demo; r = Path(sys.argv[1]); "
                                 "demo.make_dataset(r / 'raw'); demo.preprocess(r)", str(box.nn)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield box
    finally:
        if box.prep.poll() is None:
            box.prep.kill()
        box.prep.wait()
        box.stop()
        if box.owned:
            shutil.rmtree(box.scratch, ignore_errors=True)


def config_text(sections: dict) -> str:
    return "\n".join(f"[{sec}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())
                     for sec, body in sections.items())


def fake_job(sd, name: str, instance: str | None = None, env: dict | None = None, **sections) -> Job:
    """A fold of its own under /opt/data/<name>, and the config that trains it (edited in place, like
    sudoedit; an instance's file is created as the install hints say: group cardiacseg, mode 0640)."""
    unit = f"{UNIT}@{instance}" if instance else UNIT
    sd.systemctl("stop", unit)
    sd.systemctl("reset-failed", unit, check=False)
    root = sd.scratch / "opt" / "data" / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    job = Job(root)
    sd.sh(f"chown -R cardiacseg:cardiacseg /opt/data/{name}\nrm -rf {STATE}/{instance or '*'}")
    base = {"training": {"command": [TRAINER], "dataset": DATASET, "configuration": "3d_fullres", "fold": 0,
                         "device": "cpu", "expected_epochs": 200},
            "paths": {"preprocessed": f"/opt/data/{name}/preprocessed", "results": f"/opt/data/{name}/results"},
            "restart": {"backoff_seconds": 0, "backoff_max_seconds": 0},
            "stop": {"timeout_seconds": 20, "checkpoint_wait_seconds": 30},
            "target": {"ema_dice": 0.95},
            "environment": {"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.3", **(env or {})}}
    for sec, body in sections.items():
        base.setdefault(sec, {}).update(body)
    path = f"/etc/cardiacseg-train/{instance}.toml" if instance else CONF
    sd.write(path, config_text(base))
    if instance:
        sd.sh(f"chgrp cardiacseg {path}\nchmod 0640 {path}")
    job.conf, job.unit, job.sections = path, unit, base
    job.state_dir = f"{STATE}/{instance}" if instance else STATE
    return job


def state(sd, job) -> dict:
    try:
        return StateStore(sd.host(job.state_dir)).read() or {}
    except (OSError, ValueError):
        return {}


def epochs(sd, job) -> list[int]:
    return [e["epoch"] for e in state(sd, job).get("epochs", [])]


def wait_epoch(sd, job, n: int, timeout: float = 60) -> int:
    return wait_for(lambda: (e := epochs(sd, job)) and e[-1] >= n and e[-1], timeout=timeout, what=f"epoch {n}")


# ---- install -------------------------------------------------------------------------------------------
def test_install_unit_as_a_new_user_would(sd):
    out = sd.install_output
    print(f"\n[install-unit]\n{out}", file=sys.stderr)
    assert "created system user cardiacseg" in out and "problem" not in out
    assert f"sudo -u cardiacseg {VENV}/bin/cardiacseg-train check --config {CONF}" in out
    st = sd.run("stat", "-c", "%a %U:%G", CONF).stdout.split()
    assert st == ["640", "root:cardiacseg"], st  # readable by the service, by no one else
    assert sd.run("runuser", "-u", "cardiacseg", "--", "test", "-r", CONF, check=False).returncode == 0
    fake_job(sd, "install")
    r = sd.run(f"{VENV}/bin/cardiacseg-train", "check", "--quick", "--config", CONF, check=False)
    assert f"ok      service: the user cardiacseg can run {VENV}/bin/cardiacseg-train and read {CONF}" in r.stdout, \
        r.stdout + r.stderr


def test_an_install_the_service_user_cannot_run_is_refused_before_systemd_says_203(sd):
    """A venv whose python3 links into a folder only root may enter (pyenv's Python under /root): systemd
    itself only says status=203/EXEC with nothing from the program; install-unit and check say why first."""
    site = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    sd.sh("rm -rf /opt/private /opt/closedvenv /opt/otherroot\nmkdir -m 0700 /opt/private\n"
          "ln -s /usr/bin/python3 /opt/private/python3\n/usr/bin/python3 -m venv --without-pip /opt/closedvenv\n"
          "ln -sfn /opt/private/python3 /opt/closedvenv/bin/python3\n"
          f"echo {site} > /opt/closedvenv/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/x.pth\n"
          f"sed '1s|.*|#!/opt/closedvenv/bin/python3|' {VENV}/bin/cardiacseg-train > /opt/closedvenv/bin/cardiacseg-train\n"
          "chmod 0755 /opt/closedvenv/bin/cardiacseg-train")
    r = sd.run("/opt/closedvenv/bin/cardiacseg-train", "install-unit", "--root", "/opt/otherroot", check=False)
    print(f"\n[install-unit from a closed Python]\n{r.stdout}", file=sys.stderr)
    assert r.returncode == 2 and "/opt/private (mode 0700, root:root) keeps it out" in r.stdout
    assert "status=203/EXEC" in r.stdout and "/usr/bin/python3 -m venv" in r.stdout
    assert "nothing written" in r.stdout and not sd.host("/opt/otherroot/etc").exists()
    # what systemd does with it: the unit fails at exec, and the journal has nothing from the program
    sd.write("/etc/systemd/system/closed-python.service",
             "[Service]\nUser=cardiacseg\nExecStart=/opt/closedvenv/bin/cardiacseg-train --version\n")
    sd.systemctl("daemon-reload")
    sd.systemctl("start", "closed-python", check=False)
    s = sd.wait_state("closed-python", "failed")
    assert s["ExecMainStatus"] == "203"


# ---- start, status, journal ---------------------------------------------------------------------------
def test_start_reaches_active_running_through_ready_and_the_journal_has_priorities(sd):
    job = fake_job(sd, "start", env={"FAKE_FAULT": "1:crash"})
    sd.systemctl("start", UNIT)  # Type=notify: returns once READY=1 came
    s = sd.show(UNIT, "ActiveState", "SubState", "StatusText")
    assert (s["ActiveState"], s["SubState"]) == ("active", "running") and s["StatusText"], s
    line = re.compile(r"^epoch (\d+)/200 EMA \d\.\d{3} \(target 0\.95\) bs 2$")
    wait_for(lambda: (m := line.match(sd.show(UNIT, "StatusText")["StatusText"])) and int(m.group(1)) >= 3,
             timeout=60, what="STATUS= with epoch 3")
    status = sd.systemctl("status", UNIT, "-n", "0").stdout
    print(f"\n[systemctl status]\n{status}", file=sys.stderr)
    assert "Active: active (running)" in status and re.search(r'Status: "epoch \d+/200 EMA', status)
    entries = sd.journal(UNIT)
    by = lambda text: [e for e in entries if text in e["MESSAGE"]]  # noqa: E731
    assert {e["PRIORITY"] for e in by("supervisor_started")} == {"6"}
    ended = [e for e in by("attempt_ended") if "reason=crash" in e["MESSAGE"]]
    assert ended and {e["PRIORITY"] for e in ended} == {"4"}
    tb = by("Traceback (most recent call last)")
    assert len(tb) == 1 and "RuntimeError: CUDA error: an illegal memory access" in tb[0]["MESSAGE"]
    assert not [e for e in entries if e["PRIORITY"] in "0123" and "cardiacseg-train" in e.get("SYSLOG_IDENTIFIER", "")]
    warnings = sd.messages(UNIT, "-p", "warning")
    assert any("attempt_ended" in m for m in warnings) and not any(m.startswith("epoch ") for m in warnings)
    journal = sd.run("journalctl", "--no-pager", "-u", UNIT).stdout
    print("\n[journalctl -u cardiacseg-train | grep -v src=trainer]\n" + "\n".join(
        ln for ln in journal.splitlines() if "src=trainer" not in ln), file=sys.stderr)
    # journalctl -fu follows: the next epoch arrives while it runs
    seen: list[str] = []
    follow = subprocess.Popen(sd.argv("timeout", "60", "journalctl", "-fu", UNIT, "-o", "cat", "-n", "0"),
                              stdout=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: [seen.append(ln) for ln in follow.stdout], daemon=True).start()
    try:
        last = epochs(sd, job)[-1]
        wait_for(lambda: any(ln.startswith(f"epoch epoch={last + 2} ") for ln in seen), timeout=60,
                 what="journalctl -fu showing a new epoch")
    finally:
        follow.kill()
    sd.systemctl("stop", UNIT)


# ---- reload ----------------------------------------------------------------------------------------------
def test_reload_applies_a_new_target_and_a_broken_config_keeps_the_old_one(sd):
    job = fake_job(sd, "reload")
    sd.systemctl("start", UNIT)
    wait_epoch(sd, job, 2)
    good = sd.host(CONF).read_text()
    sd.write(CONF, good.replace("[restart]\n", "[restart]\nbogus_key = 1\n"))
    sd.systemctl("reload", UNIT)
    wait_for(lambda: any("reload_failed" in e["MESSAGE"] and e["PRIORITY"] == "3" for e in sd.journal(UNIT)),
             timeout=30, what="reload_failed at priority 3")
    failed = next(m for m in sd.messages(UNIT) if "reload_failed" in m)
    assert "restart.bogus_key" in failed, failed
    n = epochs(sd, job)[-1]
    wait_epoch(sd, job, n + 2)
    s = sd.show(UNIT, "ActiveState", "StatusText")
    assert s["ActiveState"] == "active" and "(target 0.95)" in s["StatusText"]
    ema = state(sd, job)["epochs"][-1]["ema"]
    target = round(ema + 0.02, 3)
    sd.write(CONF, good.replace("ema_dice = 0.95", f"ema_dice = {target}"))
    sd.systemctl("reload", UNIT)
    s = sd.wait_state(UNIT, "inactive", timeout=60)
    assert s["Result"] == "success" and s["ExecMainStatus"] == "0", s
    st = state(sd, job)
    assert st["sup"]["outcome"] == "target_reached" and st["epochs"][-1]["ema"] >= target
    assert any(f"target={target}" in m for m in sd.messages(UNIT) if m.startswith("target_reached"))


# ---- stop and start ----------------------------------------------------------------------------------------
def test_stop_waits_for_a_safe_point_leaves_nothing_and_start_resumes_with_c(sd):
    """Checkpoints take 0.6 s each (written in place, as stock nnU-Net's torch.save), so the stop mostly lands
    in one; the trainer also left a daemon outside its process group at epoch 1 (only the cgroup holds it)."""
    job = fake_job(sd, "stop", env={"FAKE_SAVE_S": "0.6", "FAKE_FAULT": "1:daemon"})
    sd.systemctl("start", UNIT)
    wait_epoch(sd, job, 3)
    daemon = int(job.fold.joinpath("daemon.pid").read_text())
    cgroup = sd.show(UNIT, "ControlGroup")["ControlGroup"]
    t0 = time.monotonic()
    sd.systemctl("stop", UNIT)
    took = time.monotonic() - t0
    s = sd.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "TimeoutStopUSec")
    print(f"\n[systemctl stop] {took:.1f} s", file=sys.stderr)
    assert s["ActiveState"] == "inactive" and s["Result"] == "success" and took < 60, (s, took)
    assert cgroup and not Path(f"/sys/fs/cgroup/systemd{cgroup}").exists()  # systemd removed the unit's cgroup
    left = sd.run("ps", "-u", "cardiacseg", "-o", "pid=,args=", check=False).stdout.strip()
    assert left == "" and sd.run("kill", "-0", str(daemon), check=False).returncode != 0, left
    checkpoints = sorted(job.fold.glob("checkpoint_*.pth"))
    assert checkpoints and [verify(ck) for ck in checkpoints] == [None] * len(checkpoints)  # none truncated
    st = state(sd, job)
    assert st["attempts"][-1]["reason"] == "stopped" and any("stopping_trainer" in m for m in sd.messages(UNIT))
    last = epochs(sd, job)[-1]
    sd.systemctl("start", UNIT)
    wait_epoch(sd, job, last + 1)
    st = state(sd, job)
    assert "--c" in st["attempts"][-1]["argv"] and st["epochs"][-1]["epoch"] >= last + 1
    assert [e for e in epochs(sd, job) if e > last][0] == last + 1  # the same epoch, not one lost or repeated
    sd.systemctl("stop", UNIT)


# ---- crashes of the supervisor, exit codes, the watchdog ---------------------------------------------------
def test_a_killed_supervisor_is_restarted_by_systemd_and_resumes(sd):
    job = fake_job(sd, "sigkill")
    sd.systemctl("start", UNIT)
    wait_epoch(sd, job, 3)
    old = sd.show(UNIT, "MainPID", "NRestarts")
    trainer = state(sd, job)["attempts"][-1]["pid"]
    sd.run("kill", "-KILL", old["MainPID"])
    s = wait_for(lambda: (x := sd.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts"))["NRestarts"] == "1"
                 and x["SubState"] == "running" and x, timeout=60, what="systemd's restart")
    assert s["MainPID"] != old["MainPID"]
    assert any("code=killed, status=9/KILL" in m for m in sd.messages(UNIT))
    # KillMode=mixed: systemd ended the old trainer with its supervisor; the new one resumes from its checkpoint
    assert sd.run("kill", "-0", str(trainer), check=False).returncode != 0
    last = epochs(sd, job)[-1]
    wait_epoch(sd, job, last + 1)
    st = state(sd, job)
    assert "--c" in st["attempts"][-1]["argv"] and st["attempts"][-1]["pid"] != trainer
    sd.systemctl("stop", UNIT)


@pytest.mark.parametrize("case,env,extra,code", [
    ("bad_config", {}, {"restart": {"bogus_key": 1}}, "2"),
    ("gave_up_diverged", {"FAKE_FAULT": "1:nan"}, {}, "3"),
])
def test_exit_2_and_3_are_not_restarted_by_systemd(sd, case, env, extra, code):
    fake_job(sd, case, env=env, **extra)
    sd.systemctl("start", UNIT, check=False)
    s = sd.wait_state(UNIT, "failed", timeout=60)
    assert (s["ExecMainStatus"], s["SubState"], s["NRestarts"]) == (code, "failed", "0"), s  # not auto-restart
    errors = sd.messages(UNIT, "-p", "err")
    if case == "bad_config":
        assert any("configuration error in /etc/cardiacseg-train/config.toml" in m for m in errors), errors
        assert any("restart.bogus_key" in m for m in errors), errors
    else:
        assert any("training diverged" in m for m in errors), errors


def test_the_watchdog_kills_and_restarts_a_supervisor_that_stops_pinging(sd):
    """SIGSTOP stands for a wedged loop. A drop-in shortens the watchdog (3 min) and the wait after its SIGABRT
    (30 s, which a stopped process cannot act on) so that the test takes seconds."""
    job = fake_job(sd, "watchdog")
    dropin = f"/etc/systemd/system/{UNIT}.service.d/watchdog.conf"
    sd.write(dropin, "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\n")
    sd.systemctl("daemon-reload")
    try:
        sd.systemctl("start", UNIT)
        wait_epoch(sd, job, 2)
        old = sd.show(UNIT, "MainPID")["MainPID"]
        sd.run("kill", "-STOP", old)
        s = wait_for(lambda: (x := sd.show(UNIT, "SubState", "MainPID", "NRestarts"))["NRestarts"] == "1"
                     and x["SubState"] == "running" and x, timeout=60, what="the watchdog's restart")
        assert s["MainPID"] != old
        assert any("Watchdog timeout" in m for m in sd.messages(UNIT))
        last = epochs(sd, job)[-1]
        wait_epoch(sd, job, last + 1)
    finally:
        sd.run("rm", "-f", dropin)
        sd.systemctl("daemon-reload")
        sd.systemctl("stop", UNIT)


# ---- another user's trainer on the fold ---------------------------------------------------------------------
def test_a_researchers_hand_run_trainer_is_seen_and_refused_with_who_must_stop_it(sd):
    job = fake_job(sd, "researcher")
    sd.sh("id researcher >/dev/null 2>&1 || useradd --no-create-home researcher\n"  # /home is the host's
          "chmod 0777 /opt/data/researcher/results")
    sd.sh("runuser -u researcher -- env nnUNet_preprocessed=/opt/data/researcher/preprocessed "
          "nnUNet_results=/opt/data/researcher/results FAKE_EPOCHS=1000 FAKE_EPOCH_S=0.3 "
          f"setsid {TRAINER} {DATASET} 3d_fullres 0 -device cpu </dev/null >/dev/null 2>&1 &")
    dropin = f"/etc/systemd/system/{UNIT}.service.d/take-over.conf"
    try:
        wait_for(lambda: sorted(job.fold.glob("training_log_*.txt")), timeout=60, what="the researcher's trainer")
        theirs = sd.run("pgrep", "-u", "researcher", "-o", "-f", "nnUNetv2_train").stdout.strip()
        for take_over in (False, True):
            if take_over:  # `run --take-over` in a drop-in, as docs/service.md shows for --quiet-trainer
                sd.write(dropin, f"[Service]\nExecStart=\nExecStart={VENV}/bin/cardiacseg-train run --take-over "
                                 f"--config {CONF}\n")
                sd.systemctl("daemon-reload")
            sd.systemctl("reset-failed", UNIT, check=False)
            sd.systemctl("start", UNIT, check=False)
            s = sd.wait_state(UNIT, "failed", timeout=60)
            assert (s["ExecMainStatus"], s["NRestarts"]) == ("2", "0"), s
            said = [m for m in sd.messages(UNIT, "-p", "err") if f"pid {theirs} (user researcher)" in m]
            assert said and "`--take-over` cannot stop it" in said[-1], sd.messages(UNIT)[-10:]
        assert sd.run("kill", "-0", theirs, check=False).returncode == 0  # untouched: only its owner stops it
        r = sd.run("runuser", "-u", "cardiacseg", "--", f"{VENV}/bin/cardiacseg-train", "check", "--quick",
                   "--config", CONF, check=False)  # as the install hints say: as the service user
        assert r.returncode == 2 and f"pid {theirs} (user researcher)" in r.stdout, r.stdout
    finally:
        sd.run("pkill", "-KILL", "-u", "researcher", check=False)
        sd.run("rm", "-f", dropin)
        sd.systemctl("daemon-reload")
        sd.systemctl("reset-failed", UNIT, check=False)


# ---- two instances; real nnU-Net under the unit's sandbox -------------------------------------------------------
def test_two_instances_side_by_side_one_of_them_real_nnunet_under_the_sandbox(sd):
    """cardiacseg-train@fake (the fake trainer) and cardiacseg-train@nnunet (real nnU-Net: torch, an
    augmentation worker process, the launcher's SIGINT at the target) run at once, each with its config,
    state directory, STATUS= and journal. The real one stops at its target after epoch 0 and exits 0: the
    hardening (ProtectSystem, PrivateTmp, SystemCallFilter, DevicePolicy, RestrictAddressFamilies,
    NoNewPrivileges, ...) lets it train and save a checkpoint that loads."""
    from supervisor.commands import demo
    fake = fake_job(sd, "instance", instance="fake")
    assert sd.prep.wait(timeout=300) == 0, sd.prep.stderr.read()[-3000:]
    sd.sh("chown -R cardiacseg:cardiacseg /opt/nn\nrm -rf /opt/nn/results")
    site = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    real = {"training": {"command": [f"{VENV}/bin/cardiacseg-train-nnunet"], "dataset": demo.DEMO_NAME,
                         "configuration": "3d_fullres", "fold": 0, "trainer": "nnUNetTrainerDemo", "device": "cpu",
                         "expected_epochs": 2},
            "paths": {"raw": "/opt/nn/raw", "preprocessed": "/opt/nn/preprocessed", "results": "/opt/nn/results"},
            "target": {"ema_dice": 0.01},
            "environment": {"nnUNet_extTrainer": f"{site}/supervisor/trainer/demo_trainers", "nnUNet_n_proc_DA": "1",
                            "nnUNet_def_n_proc": "1", "nnUNet_compile": "false", "CARDIACSEG_DEMO_EPOCHS": "2",
                            "CARDIACSEG_DEMO_ITERS": "2"}}
    path = "/etc/cardiacseg-train/nnunet.toml"
    sd.systemctl("reset-failed", f"{UNIT}@nnunet", check=False)
    sd.sh(f"rm -rf {STATE}/nnunet")
    sd.write(path, config_text(real))
    sd.sh(f"chgrp cardiacseg {path}\nchmod 0640 {path}")
    sd.systemctl("start", f"{UNIT}@fake", f"{UNIT}@nnunet")
    both = [sd.show(u, "ActiveState", "StatusText") for u in (f"{UNIT}@fake", f"{UNIT}@nnunet")]
    assert [b["ActiveState"] for b in both] == ["active", "active"], both
    wait_epoch(sd, fake, 1)
    s = sd.wait_state(f"{UNIT}@nnunet", "inactive", timeout=240)
    assert s["Result"] == "success" and s["ExecMainStatus"] == "0", (s, sd.messages(f"{UNIT}@nnunet")[-30:])
    assert sd.show(f"{UNIT}@fake", "ActiveState")["ActiveState"] == "active"  # the other one trains on
    real_log = sd.messages(f"{UNIT}@nnunet")
    print("\n[journalctl -u cardiacseg-train@nnunet, the supervisor's lines]\n" + "\n".join(
        m for m in real_log if "src=trainer" not in m), file=sys.stderr)
    assert any(m.startswith("target_reached") for m in real_log)
    assert any("cardiacseg-train-nnunet: stopped by SIGINT after epoch 0" in m for m in real_log)
    assert not [m for m in real_log if re.search(r"Operation not permitted|Bad system call|Permission denied", m)]
    assert not any("/opt/nn/" in m for m in sd.messages(f"{UNIT}@fake"))  # each journal has its own lines
    assert not any("/opt/data/" in m for m in real_log)
    st = StateStore(sd.host(f"{STATE}/nnunet")).read()
    assert st["sup"]["outcome"] == "target_reached" and state(sd, fake)["epochs"]
    fold = sd.nn / "results" / demo.DEMO_NAME / "nnUNetTrainerDemo__nnUNetPlans__3d_fullres" / "fold_0"
    assert verify(fold / "checkpoint_latest.pth") is None
    sd.systemctl("stop", f"{UNIT}@fake")
