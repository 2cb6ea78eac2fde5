"""A newcomer's first hour: --version and help pages, `status | head`, --quiet-trainer, a stop that ends
with one line instead of a traceback, and a seeded demo trainer."""
from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import structlog

from conftest import REPO, LoggedPopen
from supervisor import __version__
from supervisor.commands import cli
from supervisor.integrations import log_setup as logs


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    try:
        expected = metadata.version("cardiacseg-train")
    except metadata.PackageNotFoundError:
        expected = __version__
    assert capsys.readouterr().out.strip() == f"cardiacseg-train {expected}"


def test_every_subcommand_has_a_description_and_every_option_a_help_text():
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == set(cli.SUBCOMMANDS)
    for name, sp in subs.choices.items():
        assert sp.description and len(sp.description) > 40, name
        for action in sp._actions:
            assert action.help, f"{name} {action.option_strings}"
    for action in parser._actions:
        assert action.help, action.option_strings


def test_status_into_a_pipe_closed_early_exits_quietly(job):
    cfg = job.config()
    r, w = os.pipe()
    os.close(r)  # the reader (`head`) is gone before status writes a byte
    try:
        p = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg)], cwd=REPO,
                           stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)
    assert p.returncode == cli.EXIT_BROKEN_PIPE and p.stderr == "", p.stderr


def test_quiet_trainer_drops_trainer_lines_from_the_console_only():
    buf = io.StringIO()
    logs.setup("debug", stream=buf, journal=False, trainer_output=False)
    log = structlog.get_logger("t")
    log.info("Epoch 3", src="trainer", attempt=1)
    log.warning("attempt_ended", attempt=1, reason="crash")
    logs.setup("info", stream=buf, journal=True)  # a reload keeps the choice
    log.info("Epoch 4", src="trainer", attempt=1)
    log.info("target_reached", epoch=4)
    logs.setup("info", stream=buf, journal=True, trainer_output=True)
    log.info("Epoch 5", src="trainer", attempt=1)
    out = buf.getvalue()
    assert "Epoch 3" not in out and "Epoch 4" not in out and "attempt_ended" in out
    assert "<6>target_reached" in out and "<6>Epoch 5 src=trainer" in out
    logs.setup("info")


def test_run_quiet_trainer_keeps_the_trainer_output_in_the_attempt_log(job):
    cfg = job.config()
    p = LoggedPopen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg), "--quiet-trainer"],
                    cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, log_path=job.root / "console.log")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert "src=trainer" not in out and "supervisor_started" in out and "epoch " in out
    attempt_log = (job.state / "attempts" / "attempt-0001.log").read_text()
    assert "Epoch 1" in attempt_log or "Epoch 0" in attempt_log


STOP_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    sys.path.insert(0, {repo!r})
    from supervisor.trainer import launcher
    launcher.install_signal_handlers()
    launcher.atomic_torch_save({{"current_epoch": 3}}, os.path.join({fold!r}, "checkpoint_latest.pth"))
    # a new best: nnU-Net writes checkpoint_best after checkpoint_latest, but --c loads latest
    launcher.atomic_torch_save({{"current_epoch": 3}}, os.path.join({fold!r}, "checkpoint_best.pth"))

    def spin():
        while True:
            time.sleep(0.05)

    # an augmentation worker as batchgenerators starts it: a forked, daemonic child in the same group
    w = multiprocessing.get_context("fork").Process(target=spin, daemon=True)
    w.start()

    def main():  # the pid is printed inside the launcher's stop handling: a SIGINT may follow at once
        print(w.pid, flush=True)
        spin()

    launcher.run_until_stopped(main)
""")


@pytest.mark.nnunet
def test_a_requested_stop_ends_with_one_line_and_dies_by_sigint(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(STOP_SCRIPT.format(repo=str(REPO), fold=str(tmp_path)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        worker = int(p.stdout.readline())
        os.killpg(p.pid, signal.SIGINT)  # as the supervisor does: the whole group, workers included
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == -signal.SIGINT  # after Python's finalisation: a shell shows 130
    assert err == ("cardiacseg-train-nnunet: stopped by SIGINT after epoch 2; "
                   "--c resumes from checkpoint_latest.pth\n"), err
    try:
        os.kill(worker, 0)
        with open(f"/proc/{worker}/stat") as fh:
            assert fh.read().split(")")[1].split()[0] == "Z", "the worker outlived the trainer"
    except (ProcessLookupError, FileNotFoundError):
        pass


def test_stop_message_without_an_epoch():
    from supervisor.trainer.launcher import stop_message
    assert stop_message(signal.SIGTERM, None, None) == (
        "cardiacseg-train-nnunet: stopped by SIGTERM before the first epoch of this run finished; "
        "no checkpoint written by this run")


def test_stop_message_names_what_c_loads_not_the_last_file_written(tmp_path):
    """After a new best, checkpoint_best.pth is the last file written, but --c loads checkpoint_latest.pth."""
    from supervisor.trainer.launcher import stop_message
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"x")
    (tmp_path / "checkpoint_best.pth").write_bytes(b"x")
    assert stop_message(signal.SIGINT, 5, str(tmp_path)).endswith("; --c resumes from checkpoint_latest.pth")
    (tmp_path / "checkpoint_latest.pth").unlink()
    assert stop_message(signal.SIGINT, 5, str(tmp_path)).endswith("; --c resumes from checkpoint_best.pth")


@pytest.mark.nnunet
def test_the_demo_trainer_seeds_its_augmentation_workers(monkeypatch):
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as tm

    from supervisor.trainer.demo_trainers.demo_trainers import nnUNetTrainerDemo

    seen = []

    def recorder(**kw):
        seen.append(kw["seeds"])
        return kw["seeds"]

    def parent_get_dataloaders(self):  # what nnU-Net does: seeds=None
        return (tm.NonDetMultiThreadedAugmenter(data_loader=None, transform=None, num_processes=3, seeds=None),
                tm.NonDetMultiThreadedAugmenter(data_loader=None, transform=None, num_processes=1, seeds=None))

    monkeypatch.setattr(tm, "NonDetMultiThreadedAugmenter", recorder)
    monkeypatch.setattr(tm.nnUNetTrainer, "get_dataloaders", parent_get_dataloaders)
    t = nnUNetTrainerDemo.__new__(nnUNetTrainerDemo)
    t.demo_seed = 7
    assert t.get_dataloaders() == ([7, 8, 9], [7])
    assert tm.NonDetMultiThreadedAugmenter is recorder  # restored


def test_without_config_the_commands_use_the_documented_default_places(job):
    cfg = job.config()
    r = subprocess.run([sys.executable, "-m", "supervisor", "status"], cwd=job.root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "state:" in r.stdout, r.stderr
    assert r.stderr.strip() == f"cardiacseg-train: no --config given: using {cfg}"
    if os.path.exists(cli.DEFAULT_CONFIGS[1]):
        pytest.skip(f"{cli.DEFAULT_CONFIGS[1]} exists here: the no-config case needs a machine without it")
    empty = job.root / "elsewhere"
    empty.mkdir()
    for command in ("status", "check", "run", "plot", "slurm-script"):
        r = subprocess.run([sys.executable, "-m", "supervisor", command], cwd=empty, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (command, r.stderr)
        assert "no --config given, and neither ./config.toml nor /etc/cardiacseg-train/config.toml exists" \
            in r.stderr, (command, r.stderr)


def test_the_demo_ends_with_commands_that_work_as_printed(job, monkeypatch):
    from supervisor.commands.demo import next_steps
    cfg = job.config()
    monkeypatch.chdir(job.root)
    lines = next_steps(cfg).splitlines()
    status = next(ln.split("#")[0].split() for ln in lines if " status --config " in ln)
    assert status[-2:] == ["--config", "config.toml"]  # relative to where the person stands
    assert os.path.isfile(status[0]) and os.access(status[0], os.X_OK), status[0]  # the venv's, by its path
    r = subprocess.run(status, cwd=job.root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "state:" in r.stdout, r.stderr
    assert any(" check --config " in ln for ln in lines) and any(" plot --config " in ln for ln in lines)
