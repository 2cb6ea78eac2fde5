"""The supervisor as a real process, driving the fake trainer: restarts, target stop, signals, state."""
import json
import os
import signal
import subprocess
import sys

import psutil
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")

from conftest import DATASET, REPO, wait_for


def attempts(job):
    return job.state_json()["attempts"]


def no_group_left(pgid):
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def test_crash_and_oom_are_restarted_with_c_and_ema_matches_nnunet(job):
    cfg = job.config(env={"FAKE_FAULT": "2:crash,4:oomabrt", "FAKE_EPOCHS": "8"})
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    reasons = [a["reason"] for a in st["attempts"]]
    assert reasons == ["crash", "cuda_oom", "completed"], out
    assert [("--c" in a["argv"]) for a in st["attempts"]] == [False, True, True]
    assert st["attempts"][1]["resume_from"] == "checkpoint_latest.pth"
    assert st["sup"]["outcome"] == "completed"
    # The EMA the supervisor computed equals the trainer's own ema_fg_dice, epoch by epoch.
    ck = torch.load(job.fold / "checkpoint_final.pth", weights_only=False)
    ours = [e["ema"] for e in st["epochs"]]
    theirs = ck["logging"]["ema_fg_dice"]
    assert len(ours) == len(theirs) == 8
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4
    # every attempt has its own log with the trainer's output
    assert "torch.OutOfMemoryError" in open(st["attempts"][1]["log"]).read()


def test_target_stops_with_sigint_and_checkpoint_best_loads(job):
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_EPOCH_S": "0.2"}, target={"ema_dice": 0.40})
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    assert st["sup"]["outcome"] == "target_reached"
    (a,) = st["attempts"]
    assert a["reason"] == "target_reached" and a["exit_code"] == -signal.SIGINT
    hit = [e for e in st["epochs"] if e["ema"] >= 0.40]
    assert hit and hit[0]["epoch"] < 49  # stopped long before the end
    # SIGINT came after the checkpoint writes of that epoch: best loads and holds that epoch
    ck = torch.load(job.fold / "checkpoint_best.pth", weights_only=False)
    assert ck["current_epoch"] == hit[0]["epoch"] + 1
    assert no_group_left(a["pgid"])


def test_sigterm_stops_gracefully_and_leaves_no_process(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.3"})
    p = job.start(cfg)
    job.wait_epochs(2, timeout=60)
    pgid = attempts(job)[-1]["pgid"]
    members = [q for q in psutil.process_iter() if _pgid(q.pid) == pgid]
    assert len(members) >= 2  # trainer + its worker
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    st = job.state_json()
    assert st["sup"]["outcome"] == "stopped" and st["attempts"][-1]["reason"] == "stopped"
    assert no_group_left(pgid)


def test_a_daemon_the_trainer_double_forked_ends_with_its_attempt(job):
    """The trainer starts a daemon that double-forks, calls setsid and execs with an empty environment:
    neither the trainer's group, nor its descendants, nor the attempt marker finds it. It is orphaned to
    the supervisor (the subreaper), and the attempt's end ends it; nothing of the run is left."""
    cfg = job.config(env={"FAKE_EPOCHS": "4", "FAKE_EPOCH_S": "0.1", "FAKE_FAULT": "1:daemon"})
    p = job.start(cfg)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    pid_file = job.results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0" / "daemon.pid"
    pid = int(pid_file.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).name() != "sleep", "the daemon outlived its attempt"
    assert job.state_json()["sup"]["outcome"] == "completed"


def test_a_childs_exit_status_belongs_to_whoever_waits_for_it():
    """The loop reaps orphans while a worker thread waits for its own child (the picture, the sensor):
    reap_zombies must never take that child's exit status."""
    from supervisor.integrations import proc
    p = proc.popen(["sh", "-c", "exit 7"])
    wait_for(lambda: psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE, timeout=10, interval=0.01,
             what="the child exited")
    assert proc.reap_zombies() == [] and p.pid not in proc.orphans()
    assert p.wait(5) == 7
    proc.release(p)
    assert proc.run(["sh", "-c", "echo hi; exit 3"], capture_output=True, text=True).returncode == 3


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_trainer_config_error_is_not_restarted(job):
    cfg = job.config(training={"trainer": "MyTypoTrainer"})
    rc, out = job.run(cfg)
    assert rc == 2, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["config_error"]
    assert "Could not find requested nnunet trainer" in open(st["attempts"][0]["log"]).read()


def test_missing_command_is_a_config_error(job):
    cfg = job.config(training={"command": ["/nonexistent/nnUNetv2_train"]})
    rc, out = job.run(cfg)
    assert rc == 2, out
    assert "spawn_failed" in out


def test_gives_up_after_the_restart_budget(job):
    cfg = job.config(training={"command": [sys.executable, "-c", "raise RuntimeError('always')"]},
                     restart={"max_restarts": 2})
    rc, out = job.run(cfg)
    assert rc == 3, out
    st = job.state_json()
    assert len(st["attempts"]) == 3 and st["sup"]["outcome"] == "gave_up"
    assert "restart.max_restarts" in st["sup"]["message"]


def test_second_supervisor_on_the_same_state_dir_refuses(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.3"})
    p = job.start(cfg)
    try:
        wait_for(lambda: (job.state / "state.json").exists(), timeout=30, what="state.json")
        rc, out = job.run(cfg, timeout=30)
        assert rc == 4
        assert "already running" in out and f"pid {p.pid}" in out and "Traceback" not in out
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    assert p.returncode == 0


def test_existing_checkpoint_means_c_on_the_first_start(job):
    # a run migrated from another machine: checkpoint_latest of epoch 3 is already there
    cfg = job.config(env={"FAKE_EPOCHS": "6", "FAKE_FAULT": "4:crash"})
    rc, _ = job.run(cfg)  # makes the checkpoint; crash + restart; completes
    assert rc == 0
    (job.fold / "checkpoint_final.pth").rename(job.fold / "checkpoint_latest.pth")
    import shutil
    shutil.rmtree(job.state)
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    assert "--c" in st["attempts"][0]["argv"] and st["attempts"][0]["resume_from"] == "checkpoint_latest.pth"
    # the history came from the old training logs, so the EMA lineage is intact
    assert [e["epoch"] for e in st["epochs"]] == list(range(6))


def test_supervisor_sigkilled_then_restarted_never_runs_two_trainers(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.3"}, stop={"timeout_seconds": 10})
    p = job.start(cfg)
    job.wait_epochs(1, timeout=60)
    old = attempts(job)[-1]
    p.kill()
    p.wait()
    assert not no_group_left(old["pgid"])  # the trainer outlived its supervisor
    p2 = job.start(cfg)
    try:
        wait_for(lambda: len(attempts(job)) >= 2 and attempts(job)[-1].get("pid"), timeout=60,
                 what="second attempt")
        assert no_group_left(old["pgid"])  # stopped before the new one started
        assert attempts(job)[-2]["reason"] == "supervisor_lost"
        assert "--c" in attempts(job)[-1]["argv"]
    finally:
        p2.send_signal(signal.SIGTERM)
        out, _ = p2.communicate(timeout=60)
    assert p2.returncode == 0, out


def test_trainer_gets_default_sigint_even_when_the_supervisor_inherited_it_ignored(job):
    # nohup/`&` from a script starts the daemon with SIGINT ignored; the trainer must not inherit that
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_EPOCH_S": "0.2"}, target={"ema_dice": 0.36})
    code = ("import signal,os,sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "os.execv(sys.executable, [sys.executable, '-m', 'supervisor', 'run', '--config', sys.argv[1]])")
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    a = job.state_json()["attempts"][-1]
    assert a["reason"] == "target_reached" and a["exit_code"] == -signal.SIGINT


def test_status_json_while_running_and_after(job):
    cfg = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}, target={"ema_dice": 0.9})

    def status():
        r = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg), "--json"],
                           cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    before = status()
    assert before["state"] == "not started" and before["epoch"] is None
    p = job.start(cfg)
    try:
        job.wait_epochs(4, timeout=60)
        s = status()
        for k in ("state", "outcome", "epoch", "ema_dice", "best_ema_dice", "dice_per_class", "batch_size",
                  "restarts", "history"):
            assert k in s
        assert s["running"] and s["state"] == "running" and s["epoch"] >= 3
        assert s["batch_size"] == 2 and len(s["dice_per_class"]) == 3
        assert s["eta_target_s"] is not None and s["eta_target_s"] > 0
        assert set(s["history"][0]) >= {"reason", "exit_code", "started_at", "ended_at"}
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=60)
    s = status()
    assert not s["running"] and s["outcome"] == "stopped" and s["history"][-1]["reason"] == "stopped"
    human = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout
    assert "EMA Dice:" in human and "stopped" in human


def test_a_rewind_to_checkpoint_best_is_recorded_and_the_ema_follows_nnunets_lineage(job):
    # stock-like checkpoints (latest every 50 epochs) and a declining Dice: best stays at epoch 0, so --c
    # after a SIGKILL in epoch 3 rewinds to epoch 1, and epochs 1-3 are trained again
    cfg = job.config(env={"FAKE_EPOCHS": "6", "FAKE_EPOCH_S": "0.2", "FAKE_SAVE_EVERY": "50",
                          "FAKE_DICE_STEP": "-0.03", "FAKE_FAULT": "3:sigkill"})
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    a1, a2 = st["attempts"]
    assert a1["reason"] in ("crash", "host_oom") and a1["epoch_reached"] == 2
    assert a2["resume_from"] == "checkpoint_best.pth" and a2["epoch_start"] == 1  # really where it began
    ck = torch.load(job.fold / "checkpoint_final.pth", weights_only=False)
    ours = [e["ema"] for e in st["epochs"]]
    assert len(ours) == len(ck["logging"]["ema_fg_dice"]) == 6
    assert max(abs(a - b) for a, b in zip(ours, ck["logging"]["ema_fg_dice"])) < 1e-4


def test_a_second_supervisor_opens_nothing_and_a_finished_one_leaves_no_handle(job, tmp_path):
    """The lock comes first: a second supervisor on the same state directory exits 4 before it runs the
    sensor command or binds the metrics port. A supervisor run in-process closes every descriptor it
    opened (sockets, the epoll, the lock, the epoch log) by the time run() returns."""
    import socket as _socket
    from supervisor.config.loader import load
    from supervisor.daemon.loop import Daemon
    from supervisor.integrations.store import Lock

    runs = tmp_path / "sensor-runs"
    sensor = tmp_path / "sensor.sh"
    sensor.write_text(f'#!/bin/sh\necho x >> "{runs}"\necho "0 50"\n')
    sensor.chmod(0o755)
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = job.config(env={"FAKE_EPOCHS": "2", "FAKE_EPOCH_S": "0.05"},
                     thermal={"enabled": True, "source": "command", "command": [str(sensor)], "poll_seconds": 3600},
                     metrics={"listen": f"127.0.0.1:{port}"})
    job.state.mkdir(parents=True)
    holder = Lock(job.state)
    holder.acquire()
    try:
        r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
    finally:
        holder.release()
    assert r.returncode == 4 and "already running" in r.stderr, r.stderr
    assert not runs.exists()  # the sensor never ran: the lock was refused first

    def fds():
        return set(os.listdir("/proc/self/fd"))
    before = fds()
    try:
        assert Daemon(load(cfg)).run() == 0
    finally:
        import ctypes
        ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER off: pytest is no subreaper
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds() - before if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, leaked
    with _socket.socket() as s:
        s.bind(("127.0.0.1", port))  # the metrics port is free again
