"""`check` tests what `run` will do: the command as run resolves it, the trainer class as nnU-Net finds it,
the dataset, what the run must write, room for checkpoints, torch's CUDA build against the driver."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pynvml
import pytest

from conftest import REPO, Job
from supervisor.commands import check
from supervisor.config import loader as config_mod
from supervisor.trainer.demo_trainers import DIR as DEMO_TRAINERS


def findings(cfg_path, fn, *extra):
    out: list[check.Finding] = []
    fn(config_mod.load(cfg_path), *extra, out)
    return out


def text(out) -> str:
    return check.render(out)


def test_check_resolves_the_default_command_like_run_without_the_venv_on_path(job):
    launcher = Path(sys.executable).parent / "cardiacseg-train-nnunet"
    if not launcher.exists():
        pytest.skip("the launcher is not installed next to this interpreter")
    cfg = job.config(training={"command": ["cardiacseg-train-nnunet"]})
    # how the README and the systemd unit run it: by the venv's absolute path, the venv not on PATH
    r = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(cfg)], cwd=REPO,
                       env={**os.environ, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert f"ok      training command: {launcher}" in r.stdout, r.stdout
    # device = "cpu" on a machine without NVML: the thermal part passes (the guard's default follows the device)
    assert "ok      thermal guard off" in r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_thermal_default_follows_the_device(job):
    assert "thermal guard off" in text(findings(job.config(), check._check_thermal))
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works here: the cuda half needs a machine without it")
    except pynvml.NVMLError:
        pass
    out = findings(job.config(training={"device": "cuda"}), check._check_thermal)
    assert any(f.fatal for f in out), text(out)  # on for cuda, and no NVML here


@pytest.mark.nnunet
def test_a_misspelt_trainer_is_fatal_with_where_it_looked_and_the_close_match(job):
    env = {"nnUNet_extTrainer": str(DEMO_TRAINERS)}
    cfg = config_mod.load(job.config(env=env, training={"trainer": "nnUNetTrainerDemoo"}))
    out: list[check.Finding] = []
    info, why = check.run_probe(cfg, check.job.build_env(cfg))
    check._check_trainer(cfg, info, why, out)
    bad = [f for f in out if f.fatal]
    assert len(bad) == 1, text(out)
    msg = bad[0].what
    assert "training.trainer" in msg and "'nnUNetTrainerDemoo'" in msg
    assert str(DEMO_TRAINERS) in msg and "nnunetv2/training/nnUNetTrainer" in msg
    assert "did you mean 'nnUNetTrainerDemo'" in msg

    cfg = config_mod.load(job.config(env=env, training={"trainer": "nnUNetTrainerDemo"}))
    out = []
    info, why = check.run_probe(cfg, check.job.build_env(cfg))
    check._check_trainer(cfg, info, why, out)
    assert not any(f.fatal for f in out) and "trainer class demo_trainers.nnUNetTrainerDemo" in text(out)


@pytest.mark.parametrize("training,needle", [
    ({"dataset": "Dataset404_Nope"}, "training.dataset: 'Dataset404_Nope' not found in "),
    ({"plans": "nnUNetPlansX"}, "training.plans: "),
    ({"configuration": "2d"}, "training.configuration: '2d' is not in "),
])
def test_run_names_a_missing_dataset_plans_or_configuration_like_check(job, training, needle):
    cfg = job.config(training=training)
    out = findings(cfg, check._check_dataset)
    assert [f.level for f in out] == ["fatal"] and out[0].what.startswith(needle)
    rc, log = job.run(cfg)
    assert rc == 2, log
    assert out[0].what in log and "[oom]" not in log and "Traceback" not in log


def _as_nobody():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root (to run check as another user) and setpriv")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_check_tests_what_the_run_writes_as_the_service_user():
    prefix = _as_nobody()
    root = Path(tempfile.mkdtemp(prefix="cardiacseg-check-"))
    try:
        root.chmod(0o755)
        job = Job(root)  # folders owned by root, 0755: the service user cannot write them
        job.plans.chmod(0o666)  # ... while the plans file itself is writable
        job.state.mkdir(mode=0o777)
        job.state.chmod(0o777)
        cfg = job.config()
        r = subprocess.run([*prefix, sys.executable, "-m", "supervisor", "check", "--config", str(cfg)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        out = r.stdout
        assert r.returncode == 2, out + r.stderr
        assert f"FATAL   training.plans: {job.plans.parent} is not writable by uid 65534" in out, out
        assert f"training.plans: {job.plans} is not writable" not in out  # the file itself is fine
        assert f"FATAL   paths.results: {job.results}, where the fold folder" in out
        assert "paths.state_dir" not in out
    finally:
        shutil.rmtree(root)


def test_writable_checks_pass_when_everything_is_writable(job):
    assert findings(job.config(), check._check_writable) == []


def test_free_space_is_the_one_formula_of_the_disk_full_wait(job):
    """check and the disk-full wait both use criteria.space_needed: the checkpoint files not there yet
    (latest, best, the temp copy of a save), each as large as the largest, plus 64 MiB."""
    from supervisor.core.criteria import SPACE_MARGIN_BYTES, space_needed
    cfg = job.config()
    c = config_mod.load(cfg)
    need, how = check.checkpoint_room(c)
    assert need == 3 * check.CHECKPOINT_ESTIMATE_BYTES + SPACE_MARGIN_BYTES and "estimated" in how
    job.fold.mkdir(parents=True)
    ck = job.fold / "checkpoint_latest.pth"
    with open(ck, "wb") as fh:
        fh.truncate(1000)
    assert check.checkpoint_room(c)[0] == 2 * 1000 + SPACE_MARGIN_BYTES == space_needed(1000, 1)
    assert not any(f.fatal for f in findings(cfg, check._check_results))
    free = shutil.disk_usage(job.fold).free
    with open(job.fold / "checkpoint_best.pth", "wb") as fh:
        fh.truncate(free)  # sparse: takes no space, but the next save's copy would not fit
    out = findings(cfg, check._check_results)
    bad = [f.what for f in out if f.fatal]
    assert len(bad) == 1 and "1 more checkpoint file(s) of the existing checkpoint's" in bad[0], text(out)


@pytest.mark.parametrize("driver,built,level", [
    (12020, "12.1", None),           # a 4090 on driver 535 (CUDA 12.2) with a cu121 build
    (12020, "12.2", None),
    (13000, "12.8", None),
    (12020, "12.4", "warning"),      # minor-version compatibility: usually runs
    (12020, "13.0", "fatal"),        # pip's default torch 2.14 (cu130) on a 12.x driver
    (11080, "12.1", "fatal"),
    (None, "12.1", None),            # no driver: nothing to compare
    (12020, None, None),             # CPU-only build: reported elsewhere
])
def test_cuda_driver_versus_torch_build(driver, built, level):
    f = check.cuda_mismatch(driver, built)
    assert (f.level if f else None) == level
    if f:
        assert "download.pytorch.org/whl/cu" in f.what and built in f.what


def test_driver_cuda_version_through_nvml(monkeypatch):
    def not_found():
        raise pynvml.NVMLError_LibraryNotFound()
    monkeypatch.setattr(pynvml, "nvmlInit", not_found)
    v, why = check.driver_cuda_version()
    assert v is None and why.startswith("NVML: ")

    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", lambda: 12020)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    assert check.driver_cuda_version() == (12020, "")
    assert calls == ["init", "shutdown"]

    def unsupported():
        raise pynvml.NVMLError_NotSupported()
    monkeypatch.setattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", unsupported)
    assert check.driver_cuda_version()[0] is None and calls[-1] == "shutdown"
