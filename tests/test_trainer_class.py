"""`run` checks the trainer class before it starts nnU-Net (integrations/trainer_class.py): a misspelt
class is exit 2 with where nnU-Net looked and the close match, and no trainer is started; a class found
by the quick scan costs no torch import; a signal cuts the slow lookup short. A configuration error the
trainer itself reports ends with its final error line and the attempt log's path."""
from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from conftest import REPO
from supervisor.config import loader as config_mod
from supervisor.integrations import trainer_class
from supervisor.trainer.demo_trainers import DIR as DEMO_TRAINERS


class Recorder:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def launcher_config(job, trainer):
    return job.config(env={"nnUNet_extTrainer": str(DEMO_TRAINERS)},
                      training={"command": ["cardiacseg-train-nnunet"], "trainer": trainer})


@pytest.mark.nnunet
def test_run_refuses_a_misspelt_trainer_class_before_starting_nnunet(job):
    cfg = launcher_config(job, "nnUNetTrainerDemoo")
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert f"configuration error in {cfg}" in r.stderr
    assert "training.trainer: no nnU-Net trainer class 'nnUNetTrainerDemoo'" in r.stderr
    assert str(DEMO_TRAINERS) in r.stderr and "did you mean 'nnUNetTrainerDemo'" in r.stderr
    assert "Traceback" not in r.stderr
    # nothing was started or decided: no attempt, no state
    assert "attempt_started" not in r.stderr and not list(job.state.glob("attempts/*.log"))
    assert not (job.state / "state.json").exists()


def test_a_class_the_quick_scan_finds_costs_no_probe(job):
    log = Recorder()
    cfg = config_mod.load(launcher_config(job, "nnUNetTrainerDemo"))
    assert trainer_class.before_start(cfg, log) is None
    assert log.lines == []  # found in the files: nnU-Net (and torch) were not asked
    # a command of one's own is not checked at all, whatever -tr says
    cfg = config_mod.load(job.config(training={"trainer": "MyTypoTrainer"}))
    assert trainer_class.before_start(cfg, log) is None and log.lines == []


def test_a_signal_cuts_the_slow_lookup_short_and_the_run_goes_on(job):
    log = Recorder()
    cfg = config_mod.load(launcher_config(job, "nnUNetTrainerDemoo"))
    children = psutil.Process().children()
    assert trainer_class.before_start(cfg, log, cancelled=lambda: True) is None
    levels = [(lv, ev) for lv, ev, _kw in log.lines]
    assert levels == [("info", "checking_trainer_class"), ("warning", "trainer_class_unchecked")], log.lines
    assert log.lines[1][2]["why"] == "cut short by a signal"
    assert psutil.Process().children() == children  # the probe was ended and reaped


def test_a_configuration_error_names_the_final_error_line_and_the_log(job):
    # the fake trainer fails like nnU-Net on an unknown -tr (a command of one's own: no check before)
    cfg = job.config(training={"trainer": "MyTypoTrainer"})
    rc, out = job.run(cfg)
    assert rc == 2, out
    st = job.state_json()
    log = st["attempts"][0]["log"]
    msg = st["sup"]["message"]
    assert msg.startswith("the trainer reported a configuration error: RuntimeError: Could not find requested "
                          "nnunet trainer MyTypoTrainer"), msg
    assert f"its whole output is in {log}" in msg and msg.endswith("restarting cannot help")
    finished = [line for line in out.splitlines() if " finished " in line]
    assert finished and log in finished[-1] and "MyTypoTrainer" in finished[-1], out
