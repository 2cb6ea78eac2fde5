"""One fold parser for every command (config/folds.py): in a list of folds (`slurm-script --folds`,
`pack --folds`, `[queue] folds`) `all` is every fold of splits_final.json, and a fold the split lacks or one
given twice is refused with the file that says so; a queue of one job trains that job. (`pack --folds`:
tests/test_pack.py.)"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATASET, REPO
from supervisor.config.folds import expand


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def three_fold_split(job):
    path = job.pre / DATASET / "splits_final.json"
    path.write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 3))
    return path


def array_line(script: str) -> str | None:
    return next((ln for ln in script.splitlines() if ln.startswith("#SBATCH --array=")), None)


def without_state_dir(job, **sections):
    cfg = job.config(**sections)
    cfg.write_text(cfg.read_text().replace(f"state_dir = {json.dumps(str(job.state))}\n", ""))
    return cfg


def test_slurm_script_expands_all_from_the_split_and_refuses_what_it_lacks(job):
    cfg = without_state_dir(job)
    # no split drawn yet: nnU-Net will draw 5 folds
    r = cli("slurm-script", "--config", str(cfg), "--folds", "all")
    assert r.returncode == 0 and array_line(r.stdout) == "#SBATCH --array=0,1,2,3,4", r.stderr
    splits = three_fold_split(job)
    r = cli("slurm-script", "--config", str(cfg), "--folds", "all")
    assert r.returncode == 0 and array_line(r.stdout) == "#SBATCH --array=0,1,2", r.stderr
    r = cli("slurm-script", "--config", str(cfg), "--folds", "0-4")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"cardiacseg-train: --folds 0-4: fold 3, 4 does not exist: {splits} has 3 folds "
                                "(0-2)")
    r = cli("slurm-script", "--config", str(cfg), "--folds", "all,1")
    assert r.returncode == 2 and "fold 1 given twice (all = 0-2)" in r.stderr and "Traceback" not in r.stderr
    # `all` is several folds: a state_dir set in the file would be shared by the array's tasks
    r = cli("slurm-script", "--config", str(job.config()), "--folds", "all")
    assert r.returncode == 2 and "would be shared by the array's tasks" in r.stderr, r.stderr


def test_expand_keeps_the_order_given_and_names_the_source():
    assert expand([2, 0], [0, 1, 2], "s") == [2, 0]
    assert expand(["all"], [0, 1, 2, 3], "s") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="fold 5 does not exist: s"):
        expand([5], [0, 1], "s")
    with pytest.raises(ValueError, match=r"fold 0, 1 given twice \(all = 0-1\)"):
        expand(["all", "all"], [0, 1], "s")


def test_a_queue_of_all_folds_lists_the_split_and_a_queue_of_one_trains_that_fold(job):
    three_fold_split(job)
    r = cli("status", "--config", str(job.config(queue={"folds": "all"})), "--json")
    assert r.returncode == 0, r.stderr
    assert [(j["configuration"], j["fold"]) for j in json.loads(r.stdout)["jobs"]] == [
        ("3d_fullres", 0), ("3d_fullres", 1), ("3d_fullres", 2)]
    r = cli("status", "--config", str(job.config(queue={"folds": [0, 4], "gpus": ["0", "0"]})))
    assert r.returncode == 2 and "queue.folds: fold 4 does not exist" in r.stderr
    assert "queue.gpus: expected each GPU in one slot only" in r.stderr  # every problem at once
    # one job: trained as [training] naming it would be (it used to train [training] fold instead)
    rc, out = job.run(job.config(queue={"folds": [2]}, environment={"FAKE_EPOCHS": "2"}))
    assert rc == 0, out
    st = job.state_json()
    assert st["job"]["fold"] == 2 and st["attempts"][0]["argv"][-9:-6] == [DATASET, "3d_fullres", "2"]
