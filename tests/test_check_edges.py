"""`check` for the edit-and-check loop and for queues: it says what it is doing while a child process
imports torch, `--quick` skips those children, a queue's every job is checked, and a results folder
nnU-Net will create is not a problem."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def check(cfg, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(cfg), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_imports_no_torch_and_still_names_a_misspelt_trainer(job):
    r = check(job.config(training={"trainer": "nnUNetTrainerr"}), "--quick", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # no step that takes a while, so nothing to announce
    assert "warning training.trainer: no nnU-Net trainer class 'nnUNetTrainerr'" in r.stdout
    assert "did you mean 'nnUNetTrainer'" in r.stdout and "--quick: a scan of the files" in r.stdout
    assert "ok      --quick: torch's CUDA build and the resume checkpoint's load were not tested" in r.stdout
    r = check(job.config(), "--quick", timeout=60)
    assert "ok      trainer class nnUNetTrainer is defined in nnU-Net's trainer folders (--quick" in r.stdout


@pytest.mark.nnunet
def test_without_quick_it_says_what_takes_the_time(job):
    r = check(job.config())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.startswith("check: looking the trainer class up as nnU-Net does"), r.stderr
    assert "--quick skips it" in r.stderr
    assert "ok      trainer class nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer" in r.stdout


def test_every_job_of_a_queue_is_checked(job):
    cfg = job.config(queue={"folds": [0, 1], "configurations": ["3d_fullres", "3d_cascade_fullres"]})
    (job.results / "Dataset001_Fake" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    r = check(cfg, "--quick", timeout=60)
    for conf in ("3d_fullres", "3d_cascade_fullres"):
        for fold in (0, 1):
            assert f"ok      {conf} fold {fold}: no checkpoint in " in r.stdout, r.stdout


def test_a_results_folder_nnunet_will_create_is_fine(job, tmp_path):
    missing = tmp_path / "not-yet" / "nnUNet_results"
    r = check(job.config(paths={"results": str(missing)}), "--quick", timeout=60)
    assert r.returncode == 0, r.stdout
    assert f"ok      paths.results: {missing} does not exist yet: nnU-Net creates it at the first start" in r.stdout
    plain = tmp_path / "a-file"
    plain.write_text("")
    r = check(job.config(paths={"results": str(plain)}), "--quick", timeout=60)
    assert r.returncode == 2 and f"FATAL   paths.results: {plain} is not a directory" in r.stdout


@pytest.mark.nnunet
def test_a_queues_resume_checkpoints_load_in_one_probe(job):
    from test_pack import save_checkpoint
    cfg = job.config(queue={"folds": [0, 1]})
    for fold in (0, 1):
        fd = job.results / "Dataset001_Fake" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / f"fold_{fold}"
        fd.mkdir(parents=True)
        save_checkpoint(fd / "checkpoint_latest.pth", 3 + fold, [0.1, 0.2, 0.3])
    r = check(cfg)
    for fold in (0, 1):
        assert f"3d_fullres fold {fold}: --c will resume from " in r.stdout, r.stdout
        assert f"ok      fold {fold}: checkpoint_latest.pth, epoch {3 + fold}" in r.stdout, r.stdout
    assert r.stderr.count("check: loading the checkpoint `--c` will resume from") == 1, r.stderr
