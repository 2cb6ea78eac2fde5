"""Advice that leads to the fix (issue 22, item 7): a fold another supervisor trains is never "take it
over" (two supervisors would fight); a take-over says how the other trainer ended; `status` of a run whose
target is already met says so instead of "ETA target: 0m 00s"."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psutil

from conftest import DATASET, FAKE, REPO, wait_for
from supervisor.core.actions import Adopt
from supervisor.core.events import Start
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from test_policy import cfg


def nnunet_named(job):
    """The fake trainer under nnU-Net's own program name, so other_trainers.find recognises it."""
    bindir = job.root / "bin"
    bindir.mkdir(exist_ok=True)
    link = bindir / "cardiacseg-train-nnunet"
    link.write_text(f"#!{sys.executable}\nimport runpy, sys; sys.argv[0] = {str(FAKE)!r}; "
                    f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    link.chmod(0o755)
    return link


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "supervisor", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_a_supervised_trainer_is_never_taken_over_in_the_core():
    owned = ((4242, "cardiacseg-train-nnunet Dataset001_X 3d_fullres 0", "pid 77, state directory /srv/a"),)
    for take_over in (False, True):
        s, acts = decide(Sup(), Start(others=owned, take_over=take_over), 0, cfg())
        assert s.state == State.FAILED and s.exit_code == ExitCode.CONFIG
        assert "supervised by another cardiacseg-train (pid 77, state directory /srv/a)" in s.message
        assert "`--take-over` is refused" in s.message and "use `run --take-over`" not in s.message
        assert not any(isinstance(a, Adopt) for a in acts)


def test_a_second_supervisor_on_the_fold_points_at_the_first_not_at_take_over(job, tmp_path):
    command = {"training": {"command": [str(nnunet_named(job))]}}
    first = job.start(job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}, **command))
    try:
        job.wait_epochs(1)
        trainer = job.state_json()["attempts"][0]["pid"]
        other_state = tmp_path / "state2"
        cfg2 = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}, paths={"state_dir": str(other_state)},
                          **command)
        owner = f"pid {first.pid}, state directory {job.state}"
        for extra in ([], ["--take-over"]):
            r = cli("run", "--config", cfg2, *extra)
            assert r.returncode == ExitCode.CONFIG, r.stderr[-3000:]
            assert f"pid {trainer}" in r.stderr and f"supervised by another cardiacseg-train ({owner})" in r.stderr
            assert "`--take-over` is refused" in r.stderr and "take_over_adopted" not in r.stderr
        chk = cli("check", "--config", cfg2)
        assert f"supervised by another cardiacseg-train ({owner})" in chk.stdout, chk.stdout
        st = cli("status", "--config", cfg2)
        assert f"another trainer trains this fold: pid {trainer}" in st.stdout and f"(supervised by {owner})" in st.stdout
        # the first supervisor and its trainer were left alone
        assert psutil.pid_exists(trainer) and first.poll() is None
        assert [a["reason"] for a in job.state_json()["attempts"]] == [None]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


def test_a_take_over_says_the_other_trainer_ignored_sigint_and_was_killed(job):
    env = {**os.environ, "nnUNet_preprocessed": str(job.pre), "nnUNet_results": str(job.results),
           "FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}
    link = nnunet_named(job)
    # started like `nohup ... &` from a script: SIGINT ignored, which Python keeps
    other = subprocess.Popen([str(link), DATASET, "3d_fullres", "0", "-device", "cpu"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: list(job.fold.glob("checkpoint_latest.pth")), timeout=120, what="the other trainer")
        cfg_path = job.config(env={"FAKE_EPOCHS": "2", "FAKE_EPOCH_S": "0.1"}, stop={"timeout_seconds": 3},
                              training={"command": [str(link)]})
        p = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg_path), "--take-over"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    finally:
        if other.poll() is None:
            other.kill()
        other.wait()
    out = p.stderr
    assert p.returncode == 0, out[-3000:]
    assert other.returncode == -signal.SIGKILL
    ended = next(line for line in out.splitlines() if "attempt_ended attempt=0" in line)
    assert "reason=stopped" in ended and "it ignored SIGINT for stop.timeout_seconds = 3 s" in ended, ended
    assert "killed with SIGKILL" in ended
    assert out.index("attempt_ended attempt=0") < out.index("take_over_done") < out.index("attempt_started attempt=1")
    assert job.state_json()["attempts"][0]["reason"] == "stopped"


def test_status_of_a_fold_whose_target_is_met_says_so(job):
    cfg_path = job.config(target={"ema_dice": 0.3}, env={"FAKE_EPOCHS": "100"})
    rc, out = job.run(cfg_path)
    assert rc == 0 and job.state_json()["sup"]["outcome"] == "target_reached", out
    shutil.rmtree(job.state)  # as after `unpack` on another machine: the fold folder, no state
    r = cli("status", "--config", cfg_path)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines() if ":" in line)
    epoch = int(lines["epoch"].split()[0])
    assert lines["state"].strip() == "not started"
    assert lines["message"].strip().startswith(f"the target is already met at epoch {epoch} (EMA ")
    assert lines["message"].strip().endswith("`run` will end at once (target_reached)")
    assert lines["ETA target"].strip() == f"reached at epoch {epoch}"
    assert lines["ETA end"].strip() == "-  (stops at the target)"
    rc, out = job.run(cfg_path)  # and `run` does what status said
    assert rc == 0 and "target already reached" in out, out[-2000:]
