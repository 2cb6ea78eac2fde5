"""The queue's side of two failures nnU-Net users hit (issue 23 items 6 and 4), through the queue's table:
- folds started together on nnunetv2 before 2.6 race while it unpacks the preprocessed data: the queue
  starts one job per data folder first and the others once it is past data loading (bounded);
- a job that ended because its GPU is unhealthy (outcome gpu_unhealthy, sup.unhealthy_gpus in its
  state.json): its slot is never used again, the job waits for a healthy one, and without one the queue
  ends saying so; both are notified. What the master reads from a job's state.json is tested on real files.
"""
from __future__ import annotations

import json

import pytest

from supervisor.core import queue_policy as qp
from supervisor.core.actions import Log
from supervisor.core.exit_codes import ExitCode
from supervisor.daemon import queue_jobs
from supervisor.integrations import notices
from supervisor.integrations.store import StateStore
from test_policy import cfg

K0, K1, K2 = "3d_fullres/0", "3d_fullres/1", "3d_fullres/2"


def start(c, slots=("0", "1"), **ev):
    q = qp.Queue(order=tuple(qp.jobs(c)), slots=slots, status={j.key: "pending" for j in qp.jobs(c)})
    return qp.decide_queue(q, qp.QStart(**ev), 0, c)


def launches(acts):
    return [(a.key, a.slot) for a in acts if isinstance(a, qp.Launch)]


def events(acts):
    return [a.event for a in acts if isinstance(a, Log)]


SAME_DATA = tuple((k, "nnUNetPlans_3d_fullres") for k in (K0, K1, K2))


# ---- item 6: the stagger -------------------------------------------------------------------------------------
def test_before_2_6_the_first_job_unpacks_alone_and_the_others_start_once_it_is_past_data_loading():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, acts = start(c, nnunetv2="2.5.2", data=SAME_DATA)
    assert q.stagger and launches(acts) == [(K0, "0")] and "queue_stagger" in events(acts)
    assert "waits until 3d_fullres/0 is past data loading" in q.why[K1]
    q, acts = qp.decide_queue(q, qp.QTick(), 10, c)
    assert launches(acts) == []                                   # still unpacking: nothing else starts
    q, acts = qp.decide_queue(q, qp.JobPastDataLoading(K0), 20, c)
    assert launches(acts) == [(K1, "1")] and "queue_data_loaded" in events(acts)
    assert q.why == {K2: "waits for a free GPU slot"}
    q2, acts = qp.decide_queue(q, qp.JobPastDataLoading(K0), 21, c)  # told twice: nothing more
    assert q2 == q and acts == []


@pytest.mark.parametrize("ev", [dict(nnunetv2="2.6.0", data=SAME_DATA), dict(nnunetv2="2.8.1", data=SAME_DATA),
                                dict(nnunetv2="2.5.2"),                       # no data groups measured
                                dict(nnunetv2="2.5.2", data=SAME_DATA, past_data_loading=(K2,))])
def test_no_stagger_from_2_6_without_data_groups_or_once_the_data_was_unpacked(ev):
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, acts = start(c, **ev)
    assert launches(acts) == [(K0, "0"), (K1, "1")]


def test_jobs_on_different_data_start_together():
    c = cfg(queue__folds=[0], queue__configurations=["3d_fullres", "2d"], queue__gpus=["0", "1"])
    q, acts = start(c, nnunetv2="2.5.1", data=((K0, "nnUNetPlans_3d_fullres"), ("2d/0", "nnUNetPlans_2d")))
    assert launches(acts) == [(K0, "0"), ("2d/0", "1")]


def test_a_first_job_that_never_gets_there_holds_the_others_only_until_the_deadline():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, _ = start(c, nnunetv2="2.5.2", data=SAME_DATA)
    q, acts = qp.decide_queue(q, qp.QTick(), qp.STAGGER_LIMIT_S - 1, c)
    assert launches(acts) == []
    q, acts = qp.decide_queue(q, qp.QTick(), qp.STAGGER_LIMIT_S, c)
    assert "queue_stagger_timeout" in events(acts) and launches(acts) == [(K1, "1")]


def test_a_first_job_that_ends_before_its_data_is_loaded_hands_the_unpacking_to_the_next():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, _ = start(c, nnunetv2="2.5.2", data=SAME_DATA)
    q, acts = qp.decide_queue(q, qp.JobExited(K0, ExitCode.GAVE_UP, False), 5, c)
    assert launches(acts) == [(K1, "0")]                           # the new first job, alone again
    q, acts = qp.decide_queue(q, qp.JobExited(K1, 0, True, "completed", (), True), 9, c)
    assert launches(acts) == [(K2, "0")]                           # ended past data loading: loaded


# ---- item 4: unhealthy GPUs ----------------------------------------------------------------------------------
def sick(key, gpus=(1,)):
    return qp.JobExited(key, ExitCode.GAVE_UP, False, qp.GPU_UNHEALTHY, gpus)


def test_a_slot_with_an_unhealthy_gpu_is_retired_and_its_job_waits_for_a_healthy_one():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"], queue__on_give_up="stop")
    q, acts = start(c, slot_gpus=(("0", (0,)), ("1", (1,))))
    assert launches(acts) == [(K0, "0"), (K1, "1")]
    q, acts = qp.decide_queue(q, sick(K1), 5, c)
    assert q.state == qp.QState.RUNNING                             # not a give-up, even with on_give_up = "stop"
    assert q.status[K1] == "pending" and q.bad_slots == ("1",) and q.unhealthy == {1: K1}
    notice = next(a for a in acts if isinstance(a, qp.QNotice))
    assert notice.kind == "gpu_unhealthy" and "no job starts on 1 again" in notice.fields["message"]
    assert "waits for a healthy slot (0)" in notice.fields["message"] and launches(acts) == []
    q, acts = qp.decide_queue(q, qp.JobExited(K0, 0, True, "completed"), 9, c)
    assert launches(acts) == [(K1, "0")]                           # in queue order, on the healthy slot
    q, acts = qp.decide_queue(q, qp.JobExited(K1, 0, True, "completed"), 19, c)
    assert launches(acts) == [(K2, "0")]
    q, acts = qp.decide_queue(q, qp.JobExited(K2, 0, True, "completed"), 29, c)
    assert acts[-1] == qp.QFinish(ExitCode.OK) and q.bad_slots == ("1",)


def test_every_slot_holding_a_reported_gpu_is_retired_by_what_nvml_maps_it_to():
    c = cfg(queue__folds=[0, 1], queue__gpus=["GPU-8f2a", "0", "1"])
    q, _ = start(c, slots=("GPU-8f2a", "0", "1"), slot_gpus=(("GPU-8f2a", (1,)), ("0", (0,)), ("1", (1,))))
    q, acts = qp.decide_queue(q, sick(K0), 5, c)                   # it ran on GPU-8f2a, which is NVML's GPU 1
    assert q.bad_slots == ("GPU-8f2a", "1") and launches(acts) == []  # "1" is free, but GPU 1 too
    q, acts = qp.decide_queue(q, qp.JobExited(K1, 0, True, "completed"), 9, c)
    assert launches(acts) == [(K0, "0")]


def test_without_a_healthy_slot_the_queue_ends_saying_so_and_tells_a_person():
    c = cfg(queue__folds=[0, 1])
    q, _ = start(c, slots=(None,))
    q, acts = qp.decide_queue(q, sick(K0, (0,)), 5, c)
    assert q.state == qp.QState.DONE and acts[-1] == qp.QFinish(ExitCode.GAVE_UP)
    assert q.status == {K0: qp.NO_HEALTHY_GPU, K1: qp.NO_HEALTHY_GPU}
    final = [a for a in acts if isinstance(a, qp.QNotice)][-1]
    assert final.fields["message"].startswith("queue ended: no healthy GPU slot is left (GPU 0 (reported by "
                                              "3d_fullres/0))") and "2 job(s) not trained" in final.fields["message"]
    kind, fields = notices.notice_for(final)                      # what [notify] sends
    assert kind == "gpu_unhealthy" and "no healthy GPU slot" in notices.body(kind, fields, {})["message"]


def test_the_jobs_still_running_finish_before_the_queue_ends():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, _ = start(c)
    q, _ = qp.decide_queue(q, sick(K0, (0,)), 5, c)
    q, acts = qp.decide_queue(q, sick(K1, (1,)), 6, c)
    assert q.state == qp.QState.DONE and q.status[K2] == qp.NO_HEALTHY_GPU and acts[-1] == qp.QFinish(3)


def test_only_a_gpu_unhealthy_give_up_retires_a_slot():
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, _ = start(c)
    # a give-up for another reason, with GPUs an earlier run reported still in its state.json
    q, acts = qp.decide_queue(q, qp.JobExited(K1, ExitCode.GAVE_UP, False, "gave_up", (1,)), 5, c)
    assert q.bad_slots == () and q.status[K1] == "gave_up" and launches(acts) == [(K2, "1")]


def test_while_stopping_the_job_is_not_started_again():
    c = cfg(queue__folds=[0, 1], queue__gpus=["0", "1"])
    q, _ = start(c)
    q, _ = qp.decide_queue(q, qp.QSignalled("SIGTERM"), 1, c)
    q, acts = qp.decide_queue(q, sick(K1), 2, c)
    assert q.bad_slots == ("1",) and launches(acts) == []
    q, acts = qp.decide_queue(q, qp.JobExited(K0, 0, False, "stopped"), 3, c)
    assert q.state == qp.QState.DONE


# ---- what the master reads from a job's state.json --------------------------------------------------------------
def write_state(path, sup, **top):
    path.mkdir(parents=True, exist_ok=True)
    StateStore(path).save({"job": {}, "sup": sup, "attempts": [], **top})


def test_the_master_reads_outcome_unhealthy_gpus_and_a_started_epoch_from_real_state_files(job):
    from supervisor.config import loader
    c = loader.load(job.config(queue={"folds": [0, 1, 2, 3]}))
    j = qp.jobs(c)
    write_state(queue_jobs.state_dir(c, j[0]), {"outcome": "gpu_unhealthy", "unhealthy_gpus": [1, 3]},
                attempts=[{"n": 1, "epoch_seen": True}])
    write_state(queue_jobs.state_dir(c, j[1]), {"outcome": "gpu_unhealthy", "unhealthy_gpus": [True, -1, "2", 2.0, 4]})
    write_state(queue_jobs.state_dir(c, j[2]), {"outcome": ["x"], "unhealthy_gpus": "1"}, epoch_count=3)
    assert queue_jobs.exited(c, j[0], 3) == qp.JobExited(j[0].key, 3, False, "gpu_unhealthy", (1, 3), True)
    assert queue_jobs.exited(c, j[1], 3).unhealthy_gpus == (4,)    # only ints >= 0 are GPU indices
    assert queue_jobs.exited(c, j[2], 3) == qp.JobExited(j[2].key, 3, False, None, (), True)
    assert queue_jobs.exited(c, j[3], -9) == qp.JobExited(j[3].key, -9, False)  # no state.json at all
    (queue_jobs.state_dir(c, j[3]) / "state.json").parent.mkdir(parents=True)
    (queue_jobs.state_dir(c, j[3]) / "state.json").write_text("{not json")
    assert queue_jobs.exited(c, j[3], -9) == qp.JobExited(j[3].key, -9, False)


def test_status_shows_the_unhealthy_gpus_and_what_each_pending_job_waits_for(job):
    from supervisor.commands.status_queue import render_queue
    info = {"state": "running", "running": True, "supervisor": "pid 1", "done": 0, "total": 2, "eta_queue_s": None,
            "unhealthy_gpus": {"1": K1}, "retired_slots": ["1"], "start_refused": None,
            "find_best_configuration": None,
            "jobs": [{"configuration": "3d_fullres", "fold": f, "queue_status": "pending", "epoch": None,
                      "ema_dice": None, "target_ema_dice": None, "restarts": 0, "gpu": None, "eta_s": None,
                      "waits_for": w} for f, w in ((0, "waits for a free GPU slot"), (1, None))]}
    text = render_queue(info)
    assert "GPU 1:        UNHEALTHY (reported by 3d_fullres/1): no job starts on slot(s) 1" in text
    assert "  3d_fullres fold 0 waits for a free GPU slot" in text
    json.dumps(info)


# ---- the stagger with real job supervisors and trainers ------------------------------------------------------------
def test_a_real_queue_on_nnunetv2_2_5_starts_the_second_fold_once_the_first_is_past_unpacking(job, tmp_path):
    import subprocess
    import sys
    from conftest import REPO, clean_env, wait_for
    plans = json.loads(job.plans.read_text())
    plans["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_3d_fullres"
    job.plans.write_text(json.dumps(plans))
    pp = tmp_path / "site"  # a sound nnunetv2 2.5 environment, as pip leaves it (metadata ahead of this venv's)
    for name, version in (("nnunetv2", "2.5.2"), ("torch", "2.5.1")):
        (pp / f"{name}-{version}.dist-info").mkdir(parents=True)
        (pp / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Name: {name}\nVersion: {version}\n")
    done = tmp_path / "unpacked"
    cfg = job.config(env={"PYTHONPATH": str(pp), "FAKE_EPOCHS": "2", "FAKE_UNPACK_UNTIL": str(done),
                          "FAKE_UNPACK_FOLDS": "0"}, queue={"folds": [0, 1], "gpus": ["0", "1"]})
    p = job.start(cfg)
    try:
        fold0 = job.results / "Dataset001_Fake" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
        wait_for(lambda: any("unpacking dataset..." in f.read_text() for f in fold0.glob("training_log_*")),
                 timeout=120, what="fold 0 unpacking")
        q = json.loads((job.state / "queue.json").read_text())
        assert q["stagger"] and [j["status"] for j in q["jobs"]] == ["running", "pending"]
        assert "waits until 3d_fullres/0 is past data loading" in q["jobs"][1]["waits_for"]
        text = subprocess.run([sys.executable, "-m", "supervisor", "status", "--config", str(cfg)], cwd=REPO,
                              env=clean_env(), capture_output=True, text=True, timeout=120).stdout
        assert "3d_fullres fold 1 waits until 3d_fullres/0 is past data loading (nnunetv2 before 2.6" in text, text
        assert not fold0.with_name("fold_1").exists()  # its trainer was not started
        done.touch()
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-3000:]
    assert out.index("queue_data_loaded") < out.index("queue_job_started job=3d_fullres/1"), out[-3000:]
    assert "queue_finished summary='2/2 jobs done'" in out


def test_npz_data_is_unpacked_by_2_6_and_later_too_so_they_stagger():
    """nnunetv2 2.8.1's nnUNetDatasetNumpy.unpack_dataset converts .npz cases to .npy at every start: data
    preprocessed by an older nnunetv2 races as before (the queue master measures the folder: npz_data)."""
    c = cfg(queue__folds=[0, 1, 2], queue__gpus=["0", "1"])
    q, acts = start(c, nnunetv2="2.8.1", data=SAME_DATA, npz_data=True)
    assert q.stagger and launches(acts) == [(K0, "0")]
