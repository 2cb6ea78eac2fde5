"""A cascade stage's input (issue 23 item 7): before a 3d_cascade_fullres fold starts, the 3d_lowres
prediction of every case it trains on must be in predicted_next_stage (nnunetv2 2.8.1's nnUNetTrainer:
folder_with_segs_from_previous_stage, written by perform_actual_validation). `run` refuses (exit 2) and
`check` says which cases are missing and the command that writes them; careless layouts (an empty folder,
a linked one, a dangling link, empty files, no split yet) are each judged."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import DATASET, REPO
from supervisor.config import loader
from supervisor.core import cascade as core
from supervisor.integrations import cascade

CASES = [f"case_{i:03d}" for i in range(10)]
SPLITS = [{"train": [c for c in CASES if c not in CASES[2 * k:2 * k + 2]], "val": CASES[2 * k:2 * k + 2]}
          for k in range(5)]  # fold k validates cases 2k and 2k+1


def lay_out(job, predicted=CASES[:6], trained=(0, 1, 2, 3), ending=".b2nd", splits=SPLITS):
    """nnU-Net's layout after `nnUNetv2_plan_and_preprocess -c 3d_lowres 3d_fullres` and lowres training."""
    ds = job.pre / DATASET
    job.plans.write_text(json.dumps({"dataset_name": DATASET, "plans_name": "nnUNetPlans", "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [48, 48, 48]},
        "3d_lowres": {"inherits_from": "3d_fullres", "data_identifier": "nnUNetPlans_3d_lowres",
                      "next_stage": "3d_cascade_fullres"},
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}}}))
    (ds / "nnUNetPlans_3d_fullres").mkdir(exist_ok=True)
    for c in CASES:
        (ds / "nnUNetPlans_3d_fullres" / f"{c}.b2nd").write_bytes(b"x")
        (ds / "nnUNetPlans_3d_fullres" / f"{c}_seg.b2nd").write_bytes(b"x")
        (ds / "nnUNetPlans_3d_fullres" / f"{c}.pkl").write_bytes(b"x")
    if splits is not None:
        (ds / "splits_final.json").write_text(json.dumps(splits))
    low = job.results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_lowres"
    for f in trained:
        (low / f"fold_{f}").mkdir(parents=True, exist_ok=True)
        (low / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"x")
    pred = low / "predicted_next_stage" / "3d_cascade_fullres"
    if predicted is not None:
        pred.mkdir(parents=True, exist_ok=True)
        for c in predicted:
            (pred / f"{c}{ending}").write_bytes(b"prediction")
    return pred


def cfg_of(job, **training):
    return loader.load(job.config(training={"configuration": "3d_cascade_fullres", **training}))


def test_every_case_present_is_ok_and_the_folder_is_nnunets(job):
    pred = lay_out(job, predicted=CASES)
    assert cascade.predictions_dir(cfg_of(job), "3d_lowres") == pred
    level, text = cascade.finding(cfg_of(job))
    assert level == "ok" and "each of its 10 training cases" in text
    assert cascade.finding(loader.load(job.config())) is None  # 3d_fullres is no cascade stage


def test_missing_cases_are_named_with_a_count_and_the_command_per_lowres_fold(job):
    lay_out(job)  # folds 0-2 validated; fold 3 trained but not validated; fold 4 not trained
    level, text = cascade.finding(cfg_of(job))
    assert level == "fatal", text
    assert "lacks 4: case_006, case_007, case_008 and 1 more" in text
    assert f"nnUNetv2_train {DATASET} 3d_lowres 3 --val --npz" in text
    assert f"`nnUNetv2_train {DATASET} 3d_lowres 4 --npz` (fold 4 is not trained" in text
    # a trainer and plans of one's own are in the command
    text = cascade.finding(cfg_of(job, trainer="nnUNetTrainerX"))[1]
    assert "-tr nnUNetTrainerX" in text and "nnUNetTrainerX__nnUNetPlans__3d_lowres" in text


def test_an_empty_folder_a_missing_one_and_empty_files(job):
    pred = lay_out(job, predicted=[])
    level, text = cascade.finding(cfg_of(job))
    assert level == "fatal" and "lacks 10:" in text
    pred.rmdir()
    assert "(missing) lacks 10" in cascade.finding(cfg_of(job))[1]
    lay_out(job, predicted=CASES)
    (pred / "case_003.b2nd").write_bytes(b"")  # an export cut short
    level, text = cascade.finding(cfg_of(job))
    assert level == "fatal" and "lacks 1: case_003 (1 of them empty files" in text


def test_a_linked_folder_is_followed_as_nnunet_follows_it_and_a_dangling_link_is_said(job, tmp_path):
    pred = lay_out(job, predicted=None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for c in CASES:
        (elsewhere / f"{c}.b2nd").write_bytes(b"p")
    pred.parent.mkdir(parents=True)
    pred.symlink_to(elsewhere)
    assert cascade.finding(cfg_of(job))[0] == "ok"
    pred.unlink()
    pred.symlink_to(tmp_path / "gone")
    level, text = cascade.finding(cfg_of(job))
    assert level == "fatal" and f"(a dangling link to {tmp_path / 'gone'})" in text


def test_the_right_kind_of_file_counts(job):
    lay_out(job, predicted=CASES, ending=".npz")  # blosc2 data: its loader opens <case>.b2nd only
    assert "lacks 10" in cascade.finding(cfg_of(job))[1]
    ds = job.pre / DATASET / "nnUNetPlans_3d_fullres"
    for p in ds.glob("*.b2nd"):  # numpy data (nnunetv2 before 2.6): .npz or .npy
        p.rename(p.with_suffix(".npz"))
    assert cascade.finding(cfg_of(job))[0] == "ok"


def test_no_split_yet_and_fold_all(job):
    lay_out(job, predicted=CASES[:3], trained=(), splits=None)
    level, text = cascade.finding(cfg_of(job))
    assert level == "fatal" and "lacks 7" in text and "no 3d_lowres fold was trained yet" in text
    # fold "all": every case of the preprocessed data, whatever the split says
    lay_out(job, predicted=CASES[:9])
    assert "lacks 1: case_009" in cascade.finding(cfg_of(job, fold="all"))[1]


def test_what_a_queued_lowres_fold_will_write_is_coming_not_missing():
    x = core.Input(dataset="D", configuration="3d_cascade_fullres", fold=0, previous="3d_lowres", folder="/p",
                   folder_state="ok", required=("a", "b", "c"), present=frozenset({"a"}),
                   val_fold=(("a", 0), ("b", 1), ("c", 2)), queued=frozenset({1, 2}))
    level, text = core.judge(x)
    assert level == "ok" and "2 will be written by the queue's 3d_lowres fold(s) 1, 2" in text
    level, text = core.judge(x.__class__(**{**x.__dict__, "queued": frozenset({1})}))
    assert level == "fatal" and "lacks 1: c" in text


def run(cfg, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "supervisor", *args, "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_refuses_an_incomplete_cascade_with_exit_2_and_status_shows_why(job):
    lay_out(job)
    cfg = job.config(training={"configuration": "3d_cascade_fullres"})
    r = run(cfg, "run")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "lacks 4: case_006" in r.stderr and "3d_lowres 3 --val --npz" in r.stderr and "Traceback" not in r.stderr
    assert not (job.results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres").exists()  # nothing ran
    s = run(cfg, "status")
    assert s.returncode == 0 and "refused:" in s.stdout and "3d_lowres 3 --val --npz" in s.stdout, s.stdout
    c = run(cfg, "check", "--quick")
    assert c.returncode == 2 and "FATAL   3d_cascade_fullres fold 0 trains on the 3d_lowres prediction" in c.stdout


@pytest.mark.parametrize("folds,ok", [([0, 1, 2, 3, 4], True), ([0, 1], False)])
def test_a_queue_counts_its_lowres_folds_as_coming(job, folds, ok):
    lay_out(job, predicted=CASES[:4], trained=(0, 1))
    cfg = job.config(queue={"folds": folds, "configurations": ["3d_lowres", "3d_cascade_fullres"]})
    c = run(cfg, "check", "--quick")
    assert ("FATAL   3d_cascade_fullres fold 0" in c.stdout) != ok, c.stdout
    if ok:
        assert "will be written by the queue's 3d_lowres fold(s) 0, 1, 2, 3, 4" in c.stdout
    else:
        assert "lacks 6: case_004" in c.stdout
