"""The batch-size fit (issue 25 item 1): before the first attempt on a GPU, probe the training step at
increasing batch sizes, choose the largest that keeps [tune] fit_headroom free, write it to the plans.

There is no GPU here: the probe child measures a memory model instead (CARDIACSEG_FIT_MODEL, the test hook;
peak = fixed + per sample x batch size, a CUDA OOM above the GPU's memory). The search and the choice are
the same code on a GPU (tests/gpu/test_gpu.py runs the real probe there); one e2e test runs nnU-Net's real
training step on the CPU under the model, so the GPU path's nnU-Net plumbing is checked too.
"""
import json
import subprocess
import sys

import pytest

from conftest import REPO, Job
from supervisor.core import batch_fit
from supervisor.core.actions import CancelFit, FitBatchSize, InspectCheckpoints, SetBatchSize, StateChanged
from supervisor.core.events import BatchSizeFitted, BatchSizeSet, Signalled, Start, Tick
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from supervisor.integrations import fit
from supervisor.integrations.plans import BACKUP_SUFFIX
from test_policy import cfg

G = 2 ** 30
# a 24 GiB card: 1.5 GiB for the network and optimizer, 3.2 GiB per sample of the patch
CARD = {"total_bytes": 24 * G, "fixed_bytes": 3 * G // 2, "per_sample_bytes": 16 * G // 5, "name": "model 24 GiB",
        "uuid": "GPU-0000-model"}
PLANS = {"3d_fullres": {"batch_size": 2, "patch_size": [96, 160, 160], "median_image_size_in_voxels": [115, 320, 320]}}


def model(total=CARD["total_bytes"], fixed=CARD["fixed_bytes"], per=CARD["per_sample_bytes"], oom=None, secs=0.5):
    """measure(bs) of the memory model, in-process: (peak or None for an OOM, simulated seconds)."""
    def measure(bs):
        peak = fixed + per * bs
        return (None if peak > (oom or total) else peak), secs * bs
    return measure


def show(title, table, chosen, why):
    print(f"\n[fit] {title}\n[fit]   batch size | peak            | seconds")
    for bs, peak, s in table:
        print(f"[fit]   {bs:>10} | {'OOM' if peak is None else f'{peak / G:5.1f} GiB':<15} | {s:g}")
    print(f"[fit]   chosen: {chosen} ({why})")


# ---- the pure search and choice ----------------------------------------------------------------------
def test_search_doubles_then_bisects_and_the_choice_keeps_the_headroom():
    limit = batch_fit.limit_bytes(CARD["total_bytes"], 0.10)  # 21.6 GiB
    table, stopped = batch_fit.search(model(), start=2, upper=24, limit=limit, budget_s=300)
    assert [r[0] for r in table] == [2, 4, 8, 6, 7] and stopped is None
    assert table[2][1] is None  # 8 x 3.2 + 1.5 GiB: a CUDA OOM on a 24 GiB card ends the way up
    assert table[4][1] <= CARD["total_bytes"] and table[4][1] > limit  # 7 runs, but eats the headroom
    chosen, why = batch_fit.choose(table, CARD["total_bytes"], 0.10, upper=24)
    show("memory model: 24 GiB card, 10 % headroom, plans' batch size 2, dataset cap 24", table, chosen, why)
    assert chosen == 6
    assert batch_fit.choose(table, CARD["total_bytes"], 0.0, upper=24)[0] == 7  # no headroom: 7 fits


def test_never_above_the_dataset_cap_nor_the_plans_without_one():
    big = model(total=80 * G)
    table, _ = batch_fit.search(big, 2, upper=5, limit=72 * G, budget_s=300)
    assert [r[0] for r in table] == [2, 4, 5]
    chosen, why = batch_fit.choose(table, 80 * G, 0.1, upper=5)
    show("memory model: 80 GiB card, the dataset cap 5 binds", table, chosen, why)
    assert chosen == 5 and "the most the plans can use" in why
    assert batch_fit.upper_bound(None, 2) == 2  # no cap known: never above the plans' own size


def test_dataset_cap_is_nnunets_planner_formula():
    # nnU-Net planned these (demo dataset: 6 cases of 32^3): 3d_fullres 2 (cap 0 -> the planner's minimum 2),
    # 2d 10 (3D voxels x 0.05 / the 2D patch: 32^3 x 6 x 0.05 / 32^2 = 9.6)
    plans = {"configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [32, 32, 32],
                                               "median_image_size_in_voxels": [32.0, 32.0, 32.0]},
                                "2d": {"batch_size": 10, "patch_size": [32, 32],
                                       "median_image_size_in_voxels": [32.0, 32.0]}}}
    assert batch_fit.dataset_cap(plans, "3d_fullres", {"numTraining": 6})[0] == 2
    assert batch_fit.dataset_cap(plans, "2d", {"numTraining": 6})[0] == 10
    cap, why = batch_fit.dataset_cap({"configurations": PLANS}, "3d_fullres", {"numTraining": 100})
    assert cap == round(115 * 320 * 320 * 100 * 0.05 / (96 * 160 * 160)) == 24 and "5 %" in why
    assert batch_fit.dataset_cap(plans, "3d_fullres", {})[0] is None  # no numTraining: no cap, no raise


def test_an_oom_at_the_first_size_bisects_down_and_none_fitting_keeps_the_plans():
    small = model(total=8 * G, fixed=G, per=2 * G)  # 2 -> 5 GiB fits an 8 GiB card; 4 -> 9 GiB does not
    table, _ = batch_fit.search(small, 4, upper=24, limit=batch_fit.limit_bytes(8 * G, 0.1), budget_s=300)
    assert [r[0] for r in table] == [4, 2, 3] and table[0][1] is None
    assert batch_fit.choose(table, 8 * G, 0.1, upper=24)[0] == 3
    tiny = model(total=2 * G, fixed=G, per=2 * G)  # not even one sample fits
    table, _ = batch_fit.search(tiny, 2, upper=24, limit=2 * G, budget_s=300)
    assert [r[0] for r in table] == [2, 1] and all(r[1] is None for r in table)
    chosen, why = batch_fit.choose(table, 2 * G, 0.1, upper=24)
    assert chosen is None and "no probed batch size" in why
    assert batch_fit.choose([[1, G, 1.0], [2, 2 * G, 1.0]], 4 * G, 0.0, upper=24, floor=3) == (
        None, "only 2 fits, below the floor 3 ([oom] min_batch_size)")


def test_the_time_bound_stops_the_search_with_what_it_measured():
    table, stopped = batch_fit.search(model(secs=20.0), 2, upper=24, limit=batch_fit.limit_bytes(24 * G, 0.1),
                                      budget_s=150)
    assert [r[0] for r in table] == [2, 4] and stopped.startswith("time bound")  # 8 would take ~160 s more
    assert batch_fit.choose(table, 24 * G, 0.1, upper=24)[0] == 4


def test_hostile_plans_are_named_not_crashed_on():
    with pytest.raises(batch_fit.FitInputError,
                       match=r"configurations.3d_fullres.batch_size': expected an integer >= 1, got 0"):
        batch_fit.batch_size({"configurations": {"3d_fullres": {"batch_size": 0}}}, "3d_fullres")
    with pytest.raises(batch_fit.FitInputError, match="patch_size': expected 2 or 3 positive integers below 2"):
        batch_fit.patch_size({"configurations": {"3d_fullres": {"patch_size": [10 ** 30] * 3}}}, "3d_fullres")
    huge = {"configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [2 ** 30] * 3,
                                              "median_image_size_in_voxels": [115, 320, 320]}}}
    assert batch_fit.dataset_cap(huge, "3d_fullres", {"numTraining": 100})[0] == 2  # the planner's minimum
    # a batch size of 10**9 in the plans: bounded by the probe count, whatever the card
    table, stopped = batch_fit.search(model(secs=1e-9), 10 ** 9, upper=10 ** 9, limit=21 * G, budget_s=1e6)
    assert len(table) == batch_fit.MAX_PROBES and stopped == f"after {batch_fit.MAX_PROBES} probes"


# ---- the policy's path through the table ----------------------------------------------------------------
def fitted(table, total=24 * G, gpu=("GPU-0000-model", "model 24 GiB"), upper=24, **kw):
    return BatchSizeFitted(table=tuple(tuple(r) for r in table), total_bytes=total, uuid=gpu[0], gpu=gpu[1],
                           upper=upper, **kw)


TABLE = [[2, 8 * G, 1.0], [4, 14 * G, 2.0], [8, None, 0.5], [6, 21 * G, 3.0], [7, 23 * G, 3.5]]
ON = {"tune__batch_size_fit": True, "training__device": "cuda"}


def test_start_fits_writes_then_starts_the_first_attempt():
    c = cfg(**ON)
    s, acts = decide(Sup(), Start(batch_size=2, gpu=("GPU-0000-model", "model 24 GiB", 24 * G)), 0, c)
    assert s.state == State.IDLE and s.fit["phase"] == "probing" and s.fit_deadline == 300
    assert FitBatchSize(2, 0.1, 3, 300) in acts and not any(isinstance(a, InspectCheckpoints) for a in acts)
    s, acts = decide(s, Tick(), 10, c)
    assert acts == []  # within the time bound: waiting for the probe
    s, acts = decide(s, fitted(TABLE), 20, c)
    assert SetBatchSize(2, 6, fit=True) in acts and s.state == State.IDLE and s.fit["phase"] == "writing"
    s, acts = decide(s, BatchSizeSet(2, 6), 21, c)
    assert s.state == State.RUNNING and InspectCheckpoints() in acts and s.attempt == 1
    assert (s.batch_size, s.original_batch_size, s.fit["chosen"], s.fit["phase"]) == (6, 6, 6, "done")
    assert s.restarts == 0 and s.restart_times == ()  # a start, not a restart
    back = Sup.from_json(json.loads(json.dumps(s.to_json(21, 1000.0))), 21, 1000.0)
    assert back.fit == s.fit  # recorded in state.json


def test_the_same_size_or_a_failed_probe_starts_at_once_with_the_plans_size():
    c = cfg(**ON)
    s, _ = decide(Sup(), Start(batch_size=6, gpu=("GPU-a", "A", 24 * G)), 0, c)
    s, acts = decide(s, fitted(TABLE), 1, c)
    assert s.state == State.RUNNING and not any(isinstance(a, SetBatchSize) for a in acts)
    s, _ = decide(Sup(), Start(batch_size=2), 0, c)
    s, acts = decide(s, BatchSizeFitted(error="ModuleNotFoundError: No module named 'torch'"), 1, c)
    assert s.state == State.RUNNING and s.batch_size == 2 and s.fit["phase"] == "failed"
    assert any(getattr(a, "event", "") == "batch_size_fit_failed" for a in acts)


def test_the_time_bound_ends_the_probe_and_its_partial_table_counts():
    c = cfg(**ON, tune__fit_max_seconds=60)
    s, _ = decide(Sup(), Start(batch_size=2), 0, c)
    s, acts = decide(s, Tick(), 60, c)
    assert CancelFit(report=True) in acts and s.state == State.IDLE
    s, acts = decide(s, fitted(TABLE[:2], stopped="ended at [tune] fit_max_seconds = 60 s"), 60, c)
    assert SetBatchSize(2, 4, fit=True) in acts
    s, acts = decide(s, fitted(TABLE), 61, c)
    assert acts == []  # a second answer is not judged again


def test_a_moved_job_fits_again_on_the_new_gpu_only():
    c = cfg(**ON)
    a = ("GPU-aaaa", "NVIDIA A100 40GB", 40 * G)
    s, _ = decide(Sup(), Start(batch_size=2, gpu=a), 0, c)
    s, _ = decide(s, fitted(TABLE, gpu=("aaaa", "NVIDIA A100 40GB")), 1, c)  # torch's UUID has no GPU- prefix
    s, _ = decide(s, BatchSizeSet(2, 6), 2, c)
    s = Sup.from_json(s.to_json(2, 0.0), 0, 0.0)  # the next run reads state.json
    s2, acts = decide(s, Start(batch_size=6, gpu=a), 0, c)
    assert s2.state == State.RUNNING and not any(isinstance(x, FitBatchSize) for x in acts)
    assert any(getattr(x, "event", "") == "batch_size_fit_skipped" for x in acts)
    s3, acts = decide(s, Start(batch_size=6, gpu=("GPU-bbbb", "NVIDIA L4", 24 * G)), 0, c)
    assert s3.state == State.IDLE and FitBatchSize(6, 0.1, 3, 300) in acts
    assert [(x.old, x.new) for x in acts if isinstance(x, StateChanged)] == [("running", "idle")]


def test_a_stop_while_probing_ends_the_probe():
    c = cfg(**ON)
    s, _ = decide(Sup(), Start(batch_size=2), 0, c)
    s, acts = decide(s, Signalled("SIGTERM"), 1, c)
    assert s.state == State.DONE and acts[0] == CancelFit(report=False) and s.fit["phase"] == "cancelled"
    s, acts = decide(s, Start(batch_size=2), 5, c)  # the next run fits again
    assert any(isinstance(x, FitBatchSize) for x in acts)


def test_off_on_the_cpu_or_on_several_gpus_no_fit():
    for over in ({}, {"tune__batch_size_fit": True, "training__device": "cpu"},
                 {**ON, "training__num_gpus": 2}):
        s, acts = decide(Sup(), Start(batch_size=2), 0, cfg(**over))
        assert s.state == State.RUNNING and not any(isinstance(a, FitBatchSize) for a in acts)


# ---- the probe child on the memory model ------------------------------------------------------------------
def probe(tmp_path, plans_doc, dataset=None, model_spec=CARD, max_seconds=300):
    (tmp_path / "plans.json").write_text(json.dumps(plans_doc))
    (tmp_path / "dataset.json").write_text(json.dumps(dataset if dataset is not None else {"numTraining": 100}))
    req = {"plans": str(tmp_path / "plans.json"), "dataset_json": str(tmp_path / "dataset.json"), "dataset": "D",
           "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "plans_name": "nnUNetPlans", "fold": "0",
           "batch_size": 2, "headroom": 0.1, "iterations": 3, "max_seconds": max_seconds}
    r = subprocess.run([sys.executable, "-m", "supervisor.trainer.fit_probe", json.dumps(req)], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", fit.MODEL_ENV: json.dumps(model_spec)})
    assert "Traceback" not in r.stderr + r.stdout
    return fit.to_event(fit.read_answer_text(r.stdout), tmp_path / "log")


def test_the_probe_child_on_the_memory_model_prints_its_table(tmp_path):
    ev = probe(tmp_path, {"configurations": PLANS})
    chosen, why = batch_fit.choose([list(r) for r in ev.table], ev.total_bytes, 0.1, ev.upper)
    show(f"probe child ({ev.gpu}, {ev.total_bytes / G:.0f} GiB): {ev.upper_why}", ev.table, chosen, why)
    print("[fit]   status: " + batch_fit.describe({"phase": "done", "gpu": ev.gpu, "total_bytes": ev.total_bytes,
                                                   "headroom": 0.1, "table": [list(r) for r in ev.table],
                                                   "chosen": chosen, "from": 2, "upper": ev.upper}))
    assert ev.error is None and ev.model and [r[0] for r in ev.table] == [2, 4, 8, 6, 7] and chosen == 6


def test_the_probe_child_names_a_hostile_plans_file(tmp_path):
    ev = probe(tmp_path, {"configurations": {"3d_fullres": {**PLANS["3d_fullres"], "batch_size": 0}}})
    assert ev.table == () and "configurations.3d_fullres.batch_size': expected an integer >= 1, got 0" in ev.error
    assert str(tmp_path / "plans.json") in ev.error
    ev = probe(tmp_path, {"configurations": {"3d_fullres": {**PLANS["3d_fullres"], "patch_size": [10 ** 12] * 3}}})
    assert "patch_size': expected 2 or 3 positive integers" in ev.error
    ev = probe(tmp_path, {"configurations": PLANS}, model_spec={"total_bytes": 24 * G, "per_voxel_bytes": 9000})
    assert ev.error is None and [(r[0], r[1] is None) for r in ev.table] == [(2, True), (1, False)]  # 20.6 GiB a sample


# ---- the daemon's side: the child it starts, and whole runs with the fake trainer -------------------------
def fit_job(job: Job, model_spec=CARD, **sections):
    doc = json.loads(job.plans.read_text())
    doc["configurations"]["3d_fullres"].update(PLANS["3d_fullres"])
    job.plans.write_text(json.dumps(doc, indent=4))
    (job.plans.parent / "dataset.json").write_text(json.dumps({"numTraining": 100}))
    tune = {"batch_size_fit": True, **sections.pop("tune", {})}
    env = {fit.MODEL_ENV: json.dumps(model_spec), "FAKE_EPOCHS": "3", **sections.pop("env", {})}
    return job.config(env=env, training={"device": "cuda"}, thermal={"enabled": False}, tune=tune, **sections)


def test_a_hung_probe_is_ended_with_what_it_measured(job):
    from conftest import wait_for
    from supervisor.config.loader import load

    c = load(fit_job(job, {**CARD, "hang_at": 8}))
    c.paths.state_dir.joinpath("attempts").mkdir(parents=True)
    child = fit.FitChild.start(c, FitBatchSize(2, 0.1, 3, 300))
    try:
        wait_for(lambda: [r[0] for r in (fit.read_answer(child.log_path)[0] or {}).get("table", [])] == [2, 4],
                 what="the probe's answer after batch size 4")
        assert child.poll() is None  # stuck at 8, as a hung driver call would be
    finally:
        ev = child.kill()
    assert [r[0] for r in ev.table] == [2, 4] and ev.error is None and "fit_max_seconds = 300 s" in ev.stopped
    assert not list(c.paths.state_dir.glob("batch-size-fit-*"))  # the scratch nnUNet_results is gone
    child = fit.FitChild.start(c.replace(environment={fit.MODEL_ENV: json.dumps({**CARD, "hang_at": 0})}),
                               FitBatchSize(2, 0.1, 3, 300))
    ev = child.kill()
    assert ev.table == () and ev.error.startswith("no answer within [tune] fit_max_seconds = 300 s")


def test_run_fits_the_batch_size_and_the_step_down_remains_the_safety_net(job):
    cfg_path = fit_job(job, env={"FAKE_OOM_ABOVE_BS": "4"})  # the model says 6 fits; the trainer OOMs above 4
    original = job.plans.read_text()
    rc, out = job.run(cfg_path)
    assert rc == 0, out[-3000:]
    st = job.state_json()
    f = st["sup"]["fit"]
    assert (f["phase"], f["chosen"], f["from"], f["upper"], f["model"]) == ("done", 6, 2, 24, True)
    assert [r[0] for r in f["table"]] == [2, 4, 8, 6, 7]
    assert [(c["old"], c["new"], c["reason"]) for c in st["changes"]] == [(2, 6, "batch_size_fit"),
                                                                         (6, 5, "cuda_oom"), (5, 4, "cuda_oom")]
    assert [a["reason"] for a in st["attempts"]] == ["cuda_oom", "cuda_oom", "completed"]
    assert (job.plans.parent / ("nnUNetPlans.json" + BACKUP_SUFFIX)).read_text() == original
    assert json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 4
    assert "batch_size_fitted" in out  # (the tracebacks in `out` are the fake trainer's OOMs)

    from supervisor.commands import status
    from supervisor.config import loader
    text = status.render(status.gather(loader.load(cfg_path)))
    line = next(x for x in text.splitlines() if x.startswith("batch fit:"))
    print("\n[fit] status after the run:\n" + "\n".join(x for x in text.splitlines()
                                                       if x.startswith(("batch", "changed"))))
    assert "6 on model 24 GiB (24.0 GiB, 10% kept free: peak <= 21.6 GiB), from 2, at most 24" in line
    assert "8: OOM" in line


def test_run_with_a_hung_probe_trains_with_the_plans_size(job):
    cfg_path = fit_job(job, {**CARD, "hang_at": 0}, tune={"fit_max_seconds": 2})
    rc, out = job.run(cfg_path)
    assert rc == 0, out[-3000:]
    st = job.state_json()
    assert st["sup"]["fit"]["phase"] == "failed" and "no answer within" in st["sup"]["fit"]["error"]
    assert st["changes"] == [] and [a["reason"] for a in st["attempts"]] == ["completed"]
    assert json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 2


def test_fit_without_oom_still_checks_the_plans_batch_size(job):
    job.plans.write_text('{"configurations": {"3d_fullres": {"batch_size": 0}}}')
    rc, out = job.run(job.config(training={"device": "cuda"}, thermal={"enabled": False}, oom={"enabled": False},
                                 tune={"batch_size_fit": True}))
    assert rc == 2 and "[tune] batch_size_fit needs the batch size" in out and "got 0" in out
    assert "Traceback" not in out


@pytest.mark.e2e
def test_the_probe_runs_nnunets_real_training_step_on_the_cpu(tmp_path):
    """The GPU path's nnU-Net plumbing without a GPU: get_trainer_from_args' trainer, its network with deep
    supervision, loss and optimizer, fed the probe's random batches; memory from the model."""
    from supervisor.commands import demo

    demo.make_dataset(tmp_path / "raw")
    plans = demo.preprocess(tmp_path)
    ds = json.loads((plans.parent / "dataset.json").read_text())
    (plans.parent / "dataset.json").write_text(json.dumps({**ds, "numTraining": 80}))  # cap: 32^3 x 80 x 5 % / 32^3 = 4
    req = {"plans": str(plans), "dataset_json": str(plans.parent / "dataset.json"), "dataset": demo.DEMO_NAME,
           "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "plans_name": "nnUNetPlans", "fold": "0",
           "batch_size": 2, "headroom": 0.1, "iterations": 1, "max_seconds": 600}
    env = {**demo.nnunet_env(tmp_path), "nnUNet_results": str(tmp_path / "scratch"), "nnUNet_compile": "f",
           fit.MODEL_ENV: json.dumps({**CARD, "real_step": True})}
    r = subprocess.run([sys.executable, "-m", "supervisor.trainer.fit_probe", json.dumps(req)], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
    ev = fit.to_event(fit.read_answer_text(r.stdout), tmp_path / "log")
    assert ev.error is None, r.stdout[-3000:] + r.stderr[-3000:]
    show(f"nnU-Net's real step on the CPU, memory from the model; {ev.upper_why}", ev.table,
         *batch_fit.choose([list(x) for x in ev.table], ev.total_bytes, 0.1, ev.upper))
    assert [x[0] for x in ev.table] == [2, 4] and all(x[2] > 0 for x in ev.table)
