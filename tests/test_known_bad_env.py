"""Known-bad versions in a real trainer environment (issue 23 item 5): the versions probe reads the installed
distributions' metadata in a child with the trainer's environment, and `run` refuses a fatal combination
with exit 2, the fix and no traceback, `status` shows the refusal, `check` lists it. The environments are
real: distributions installed as pip leaves them (a dist-info folder) on the trainer's PYTHONPATH, ahead of
this venv's own."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from supervisor.config import loader
from supervisor.integrations import environment

HERE = Path(__file__).parent


def site(tmp_path: Path, **dists) -> Path:
    """A site folder holding `name==version` distributions (metadata only), as pip installs them."""
    d = tmp_path / "site"
    for name, (version, *requires) in dists.items():
        info = d / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return d


def run(cfg, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "supervisor", *args, "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_probe_reads_this_venvs_versions_and_nnunetvs_requirement(job):
    v, why = environment.measure(loader.load(job.config()))
    assert v is not None, why
    import numpy
    assert v.numpy == numpy.__version__ and v.nnunetv2 and v.torch
    assert any(r.startswith("torch") for r in v.nnunetv2_requires)  # read from nnunetv2's own metadata


def test_run_refuses_nnunetv2_before_2_6_with_torch_2_6_and_status_says_why(job, tmp_path):
    pp = site(tmp_path, nnunetv2=("2.5.2", "torch>=2.1.2"), torch=("2.6.0+cu124",))
    cfg = job.config(env={"PYTHONPATH": str(pp)})
    r = run(cfg, "run")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nnunetv2 2.5.2 with torch 2.6.0+cu124" in r.stderr and "pip install 'nnunetv2>=2.6'" in r.stderr
    assert "the trainer's environment" in r.stderr and "Traceback" not in r.stderr
    assert not job.fold.exists()  # no trainer was started
    s = run(cfg, "status")
    assert "refused:" in s.stdout and "nnunetv2>=2.6" in s.stdout, s.stdout
    # fixed (the fake distributions gone): the run goes on, and status no longer shows the refusal
    shutil.rmtree(pp)
    r = run(job.config(env={"PYTHONPATH": str(pp), "FAKE_EPOCHS": "1"}), "run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "refused:" not in run(cfg, "status").stdout


def test_check_names_torch_2_9_for_a_3d_job_on_cuda_and_only_warns_on_the_cpu(job, tmp_path):
    pp = site(tmp_path, torch=("2.9.0+cu128",))  # this venv's nnunetv2 (its metadata: torch!=2.9.*)
    r = run(job.config(env={"PYTHONPATH": str(pp)}, training={"device": "cuda"}, thermal={"enabled": False}),
            "check", "--quick")
    assert r.returncode == 2, r.stdout
    line = next(ln for ln in r.stdout.splitlines() if "torch 2.9.0+cu128" in ln)
    assert line.startswith("FATAL") and "excluded by nnunetv2" in line and "4x slower" in line
    assert "pip install 'torch!=2.9.*,>=2.1.2'" in line
    r = run(job.config(env={"PYTHONPATH": str(pp)}), "check", "--quick")
    assert r.returncode == 0 and "warning torch 2.9.0+cu128" in r.stdout, r.stdout


def test_a_numpy2_checkpoint_under_numpy_1_is_refused_naming_the_checkpoint(job, tmp_path):
    pp = site(tmp_path, numpy=("1.26.4",))
    job.fold.mkdir(parents=True)
    shutil.copy(HERE / "fixtures" / "checkpoint_numpy2.pth", job.fold / "checkpoint_latest.pth")
    cfg = job.config(env={"PYTHONPATH": str(pp)})
    r = run(cfg, "run")
    assert r.returncode == 2, r.stderr
    assert f"{job.fold / 'checkpoint_latest.pth'} was pickled under numpy 2" in r.stderr
    assert "numpy here is 1.26.4" in r.stderr and "pip install 'numpy>=2'" in r.stderr
    c = run(cfg, "check", "--quick")
    assert "FATAL   " in c.stdout and "was pickled under numpy 2" in c.stdout, c.stdout


def test_check_on_a_sound_environment_says_which_versions_it_judged(job):
    r = run(job.config(), "check", "--quick")
    assert r.returncode == 0, r.stdout
    assert "ok      versions: nnunetv2 " in r.stdout and "no known-bad combination" in r.stdout
