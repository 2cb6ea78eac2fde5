"""`status` tells the truth: no ETA to a target a class blocks, none for a finished run, no raw None,
and only the restarts the supervisor made."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from supervisor.config import loader as config_mod
from supervisor.config import job as job_mod
from supervisor.commands.status import gather, render
from supervisor.integrations.store import STATE_VERSION

JSON_KEYS = {"state", "outcome", "epoch", "ema_dice", "best_ema_dice", "dice_per_class", "batch_size",
             "restarts", "history"}


def epochs(n, third=0.0):
    out, ema = [], None
    for e in range(n):
        dice = [0.5 + 0.04 * e, 0.4 + 0.04 * e, third]
        m = sum(dice) / 3
        ema = m if ema is None else 0.9 * ema + 0.1 * m
        out.append({"epoch": e, "dice": dice, "epoch_time": 60.0, "mean_fg_dice": m, "ema": ema})
    return out


def write_state(job, cfg_path, *, sup=None, attempts=(), recs=()):
    cfg = config_mod.load(cfg_path)
    job.state.mkdir(exist_ok=True)
    (job.state / "state.json").write_text(json.dumps({
        "version": STATE_VERSION, "job": job_mod.job_identity(cfg), "sup": sup or {"state": "running"}, "attempts": list(attempts),
        "changes": [], "epochs": list(recs)}))
    return cfg


def attempt(n, reason, start=0, reached=None, exit_code=None, ended=True):
    return {"n": n, "reason": reason, "exit_code": exit_code, "started_at": 1.0e9 + n,
            "ended_at": (1.0e9 + n + 0.5) if ended else None, "epoch_start": start, "epoch_reached": reached,
            "resume_from": None, "log": None}


def test_a_class_stuck_at_zero_under_min_class_dice_blocks_the_eta(job):
    path = job.config(target={"ema_dice": 0.6, "min_class_dice": 0.3})
    cfg = write_state(job, path, recs=epochs(8))
    i = gather(cfg)
    assert i["eta_target_s"] is None and "class 3" in i["target_blocked_by"]
    assert "ETA target:   class 3 at 0.0000 for 8 epochs, below target.min_class_dice 0.3: no ETA" in render(i)
    # a rising third class does not block: the straight line gives an ETA
    rising = epochs(8)
    for k, r in enumerate(rising):
        r["dice"][2] = 0.02 * k
    cfg = write_state(job, path, recs=rising)
    i = gather(cfg)
    assert i["target_blocked_by"] is None and i["eta_target_s"] is not None


def test_a_finished_run_has_no_eta(job):
    path = job.config(target={"ema_dice": 0.9})
    cfg = write_state(job, path, sup={"state": "done", "outcome": "target_reached"}, recs=epochs(6),
                      attempts=[attempt(1, "target_reached", 0, 5, 130)])
    i = gather(cfg)
    assert i["eta_target_s"] is None and i["eta_last_epoch_s"] is None
    text = render(i)
    assert "ETA target:   -  (finished)" in text and "ETA end:      -  (finished)" in text


def test_restarts_are_the_policys_one_count(job):
    """status shows what the policy counted (Sup.restarts): a new `run` after a stop or a lost supervisor is
    not a restart, however many attempt records there are."""
    path = job.config()
    five = [attempt(1, "stopped", 0, 3, 130), attempt(2, "crash", 4, 5, 1), attempt(3, "supervisor_lost", 6, 6),
            attempt(4, "cuda_oom", 7, 7, 1), attempt(5, None, 8, None, ended=False)]
    cfg = write_state(job, path, attempts=five,
                      sup={"state": "running", "restarts": 2, "restart_reasons": {"crash": 1, "cuda_oom": 1}})
    i = gather(cfg)
    assert i["restarts"] == 2 and i["restart_reasons"] == {"crash": 1, "cuda_oom": 1}
    assert "restarts:     2  (crash 1, cuda_oom 1)" in render(i)
    cfg = write_state(job, path, attempts=five)                  # a state.json from before the count: none
    assert gather(cfg)["restarts"] == 0


def test_the_text_never_shows_none(job):
    path = job.config()
    cfg = write_state(job, path, sup={"state": "failed", "outcome": "gave_up"},
                      attempts=[attempt(1, "crash", 0, None, None), attempt(2, "config_error", 0, None, 2)])
    text = render(gather(cfg))
    assert "None" not in text and "0..-" not in text, text
    assert "#1: " in text and "from epoch 0, none finished  crash\n" in text
    assert "config_error  exit 2" in text


def test_status_json_keeps_its_keys(job):
    path = job.config()
    write_state(job, path, attempts=[attempt(1, "crash", 0, 1, 1), attempt(2, None, 2, None, ended=False)],
                recs=epochs(2), sup={"state": "running", "restarts": 1, "restart_reasons": {"crash": 1}})
    r = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(path), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    d = json.loads(r.stdout)
    assert JSON_KEYS <= set(d) and d["restarts"] == 1
    assert {"reason", "exit_code", "started_at", "ended_at"} <= set(d["history"][0])


def test_status_and_plot_by_a_user_who_cannot_read_the_state_directory():
    """An operator runs `status` or `plot` without sudo against the service's 0700 state directory: they
    say what they cannot read, and why, and show what they can; no traceback."""
    import shutil
    import tempfile
    from conftest import Job
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root (to run status as another user) and setpriv")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    root = Path(tempfile.mkdtemp(prefix="cardiacseg-status-"))
    try:
        root.chmod(0o755)
        job = Job(root)
        cfg = job.config()
        (job.state / "attempts").mkdir(parents=True)
        (job.state / "state.json").write_text('{"version": 1}')
        (job.state / "attempts" / "attempt-0001.profile.jsonl").write_text("")
        job.state.chmod(0o700)
        for argv, rc in ((["status"], 0), (["status", "--json"], 0), (["plot"], 1)):
            r = subprocess.run([*as_nobody, sys.executable, "-m", "supervisor", *argv, "--config", str(cfg)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
            out = r.stdout + r.stderr
            assert r.returncode == rc and "Traceback" not in out, (argv, out)
            assert f"cannot read {job.state / 'state.json'}: Permission denied" in out, (argv, out)
        assert '"state": "unknown"' in subprocess.run(
            [*as_nobody, sys.executable, "-m", "supervisor", "status", "--json", "--config", str(cfg)],
            cwd=REPO, capture_output=True, text=True, timeout=120).stdout
    finally:
        shutil.rmtree(root)


def test_an_attempt_stopped_by_sigint_reads_died_by_sigint(job):
    """state.json keeps Popen's -2; a person reads "died by SIGINT" (a shell would say 130), not "exit -2"."""
    from supervisor.core.exit_codes import process_exit
    rc, out = job.run(job.config(target={"ema_dice": 0.3}, env={"FAKE_EPOCHS": "100"}))
    assert rc == 0 and job.state_json()["attempts"][-1]["exit_code"] == -2, out[-2000:]
    r = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(job.root / "config.toml")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "target_reached  died by SIGINT" in r.stdout and "exit -2" not in r.stdout, r.stdout
    assert (process_exit(0), process_exit(1), process_exit(-9), process_exit(-99)) == (
        "exit 0", "exit 1", "died by SIGKILL", "died by signal 99")
