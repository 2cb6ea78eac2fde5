"""A queue of folds and configurations: one supervisor per job, one job per GPU slot, every guarantee each."""
import json
import os
import re
import signal
import subprocess
import sys

from conftest import REPO, LoggedPopen, wait_for
from supervisor.core.queue_policy import Job, schedule
from supervisor.integrations.store import StateStore


def test_schedule_fills_free_slots_in_order_and_a_cascade_waits_for_every_lowres_fold():
    """A cascade fold trains on the 3d_lowres prediction of every case, and each lowres fold's validation
    writes only its own validation cases: cascade fold 0 waits for every queued lowres fold, not fold 0."""
    pending = [Job("3d_lowres", 0), Job("3d_lowres", 1), Job("3d_cascade_fullres", 0)]
    assert schedule(pending, set(), ["0", "1"], False) == [(pending[0], "0"), (pending[1], "1")]
    assert schedule(pending[2:], set(), ["0"], False) == [(pending[2], "0")]  # lowres trained on disk
    assert schedule(pending, set(), ["0", "1", "2"], False)[-1][0] != pending[2]
    assert schedule(pending[1:], {"3d_lowres/0"}, ["0", "1"], False) == [(pending[1], "0")]  # fold 1 still to come
    # regression (review): the lowres fold is running (no longer pending): its cascade fold still waits
    everything = {j.key for j in pending}
    assert schedule(pending[2:], set(), ["1"], False, everything) == []
    assert schedule(pending[2:], {"3d_lowres/0"}, ["1"], False, everything) == []
    assert schedule(pending[2:], {"3d_lowres/0", "3d_lowres/1"}, ["1"], False, everything) == [(pending[2], "1")]


def status(cfg, *extra):
    r = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg), *extra], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_three_folds_on_two_gpus_one_crashing_once(job):
    cfg = job.config(env={"FAKE_EPOCHS": "4", "FAKE_EPOCH_S": "0.3", "FAKE_FAULT": "1:crash", "FAKE_FAULT_FOLDS": "1"},
                     queue={"folds": [0, 1, 2], "gpus": ["0", "1"]})
    rc, out = job.run(cfg, timeout=180)
    assert rc == 0, out[-4000:]
    # the master's last line says the whole queue is over, and how
    assert "queue_finished summary='3/3 jobs done'" in out.strip().splitlines()[-1], out[-2000:]
    q = json.loads((job.state / "queue.json").read_text())
    assert [j["status"] for j in q["jobs"]] == ["done", "done", "done"]
    devices = {}
    for f in (0, 1, 2):
        st = json.loads((job.state / "jobs" / f"3d_fullres-fold_{f}" / "state.json").read_text())
        assert st["sup"]["outcome"] == "completed"
        assert len(st["attempts"]) == (2 if f == 1 else 1)  # fold 1 crashed once and resumed with --c
        log = "".join(p.read_text() for p in (job.results / "Dataset001_Fake").glob(f"*/fold_{f}/training_log_*"))
        devices[f] = set(re.findall(r"CUDA_VISIBLE_DEVICES: (\S+)", log))
    assert devices[0] == {"0"} and devices[1] == {"1"}  # two slots at once, each on its own GPU
    text = status(cfg)
    assert text.startswith("queue:        all 3 jobs done\n") and re.search(r"3d_fullres\s+1\s+done", text), text
    js = json.loads(status(cfg, "--json"))
    assert [(x["configuration"], x["fold"], x["queue_status"]) for x in js["jobs"]] == [
        ("3d_fullres", 0, "done"), ("3d_fullres", 1, "done"), ("3d_fullres", 2, "done")]
    assert {"epoch", "ema_dice", "best_ema_dice", "restarts", "gpu", "outcome", "state"} <= set(js["jobs"][0])
    assert js["jobs"][1]["restarts"] == 1
    # a restarted service skips what is done
    rc, out = job.run(cfg, timeout=60)
    assert rc == 0 and out.count("queue_job_skipped") == 3


def test_a_give_up_continues_or_stops_the_queue(job):
    env = {"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.2", "FAKE_FAULT": "0:crash", "FAKE_FAULT_FOLDS": "0"}
    cfg = job.config(env=env, queue={"folds": [0, 1], "on_give_up": "continue"}, restart={"max_restarts": 0})
    rc, out = job.run(cfg, timeout=120)
    assert rc == 3, out[-3000:]
    q = json.loads((job.state / "queue.json").read_text())
    assert [j["status"] for j in q["jobs"]] == ["gave_up", "done"]


def test_a_give_up_stops_the_queue_when_asked(job):
    env = {"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.2", "FAKE_FAULT": "0:crash", "FAKE_FAULT_FOLDS": "0"}
    cfg = job.config(env=env, queue={"folds": [0, 1], "on_give_up": "stop"}, restart={"max_restarts": 0})
    rc, out = job.run(cfg, timeout=120)
    assert rc == 3
    q = json.loads((job.state / "queue.json").read_text())
    assert [j["status"] for j in q["jobs"]] == ["gave_up", "pending"]


def test_sigterm_stops_every_job_gracefully_and_a_restart_resumes(job):
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2"}, queue={"folds": [0, 1], "gpus": ["0", "1"]})
    p = job.start(cfg)
    try:
        wait_for(lambda: all((job.state / "jobs" / f"3d_fullres-fold_{f}" / "state.json").exists() and
                             (StateStore(job.state / "jobs" / f"3d_fullres-fold_{f}").read() or {}).get("epochs")
                             for f in (0, 1)), timeout=60, what="both jobs training")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    for f in (0, 1):
        st = json.loads((job.state / "jobs" / f"3d_fullres-fold_{f}" / "state.json").read_text())
        assert st["sup"]["outcome"] == "stopped"


def test_impossible_queues_are_refused_with_every_problem(job):
    (job.pre / "Dataset001_Fake" / "splits_final.json").write_text(json.dumps([{"train": [], "val": []}] * 3))
    cfg = job.config(queue={"folds": [0, 4], "configurations": ["3d_fullres", "3d_cascade_fullres", "2d"],
                            "gpus": ["0", "0"]})
    rc, out = job.run(cfg, timeout=60)
    assert rc == 2, out
    for needle in ("queue.gpus: expected each GPU in one slot only", "fold 4 does not exist", "'2d' is not in",
                   "3d_cascade_fullres fold 0 needs 3d_lowres fold 0"):
        assert needle in out, (needle, out)
    assert "Traceback" not in out


def test_overlapping_gpu_slots_are_refused(job):
    cfg = job.config(queue={"folds": [0, 1], "gpus": ["0,1", "1"]})
    rc, out = job.run(cfg, timeout=60)
    assert rc == 2 and "GPU 1 in more than one" in out and "Traceback" not in out, out


def _jobs_training(job, folds=(0, 1), n=1):
    return all(len((StateStore(job.state / "jobs" / f"3d_fullres-fold_{f}").read() or {}).get("epochs") or []) >= n
               for f in folds)


def test_a_reload_keeps_each_jobs_own_fold_gpu_and_state(job):
    """SIGHUP to the master reaches every job; each job re-reads the file through its own overrides (fold,
    CUDA_VISIBLE_DEVICES, state directory): an unchanged file changes nothing and needs no restart."""
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2"}, queue={"folds": [0, 1], "gpus": ["0", "1"]})
    p = job.start(cfg, extra_env=None)
    try:
        wait_for(lambda: _jobs_training(job), timeout=90, what="both jobs training")
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: p.log_path.read_text().count("reloaded applied") >= 2, timeout=30, what="both jobs reloaded")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert out.count("reloaded applied=[] next_restart=[]") == 2, out[-3000:]
    assert "reload_needs_supervisor_restart" not in out


def test_a_master_killed_and_started_again_adopts_the_running_jobs(job):
    """SIGKILL to the queue's master: its job supervisors (own sessions) train on. The master started
    again adopts them on their GPUs (no second supervisor or trainer), forwards its signals to them, and
    ends with their outcome. --quiet-trainer reaches the jobs (no trainer line in the log)."""
    cfg = job.config(env={"FAKE_EPOCHS": "25", "FAKE_EPOCH_S": "0.2"}, queue={"folds": [0, 1, 2], "gpus": ["0", "1"]})
    argv = [sys.executable, "-m", "supervisor", "run", "--config", str(cfg), "--quiet-trainer"]
    p = LoggedPopen(argv, cwd=REPO, log_path=job.root / "master1.log")
    try:
        wait_for(lambda: _jobs_training(job, n=2), timeout=90, what="two jobs training")
        p.kill()
        p.communicate(timeout=30)
        p2 = LoggedPopen(argv, cwd=REPO, log_path=job.root / "master2.log")
        out, _ = p2.communicate(timeout=240)
    finally:
        for x in (p, locals().get("p2")):
            if x is not None and x.poll() is None:
                x.kill()
    assert p2.returncode == 0, out[-4000:]
    assert out.count("queue_job_adopted") == 2 and "3d_fullres/2" in out
    q = json.loads((job.state / "queue.json").read_text())
    assert [j["status"] for j in q["jobs"]] == ["done", "done", "done"], q
    for f in (0, 1, 2):
        st = json.loads((job.state / "jobs" / f"3d_fullres-fold_{f}" / "state.json").read_text())
        assert st["sup"]["outcome"] == "completed" and len(st["attempts"]) == 1, (f, st["attempts"])
    logs = (job.root / "master1.log").read_text() + out
    assert "src=trainer" not in logs and "Epoch time" not in logs


def test_find_best_configuration_is_a_polled_child_a_stop_ends(job, tmp_path):
    """nnUNetv2_find_best_configuration may take hours: the master goes on turning (queue.json is
    rewritten, systemd's watchdog pinged) and a SIGTERM ends it; the queue's exit status is the jobs'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "find-best-started"
    fake = bin_dir / "nnUNetv2_find_best_configuration"
    fake.write_text(f'#!/bin/sh\necho "$@" > "{started}"\nexec sleep 1000\n')
    fake.chmod(0o755)
    cfg = job.config(env={"FAKE_EPOCHS": "2", "FAKE_EPOCH_S": "0.1"},
                     queue={"folds": [0, 1], "find_best_configuration": True})
    p = job.start(cfg, extra_env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        wait_for(started.exists, timeout=120, what="find_best_configuration started")
        t0 = json.loads((job.state / "queue.json").read_text())["updated_at"]
        wait_for(lambda: json.loads((job.state / "queue.json").read_text())["updated_at"] > t0, timeout=10,
                 what="the master still turning")
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert "find_best_configuration_stopped" in out and "-f 0 1" in started.read_text()
    assert "queue_jobs_finished summary='2/2 jobs done'" in out and "then=nnUNetv2_find_best_configuration" in out
    assert "queue_finished summary='2/2 jobs done'" in out.strip().splitlines()[-1], out[-2000:]
    fb = json.loads((job.state / "queue.json").read_text())["find_best_configuration"]
    assert fb["exit_code"] == -15
