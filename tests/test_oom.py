"""CUDA OOM steps the batch size down; host OOM halves the augmentation workers; both have their own budget."""
import json
import signal

from supervisor.core.classify import Exit
from supervisor.integrations.plans import BACKUP_SUFFIX
from supervisor.core.events import BatchSizeSet, ChildExited, Start, Tick
from supervisor.core.actions import SetBatchSize, SetWorkers, InspectCheckpoints
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup

EXIT_GAVE_UP = ExitCode.GAVE_UP
from test_policy import cfg

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
HOST = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes"


def test_policy_steps_down_without_using_the_crash_budget_then_gives_up_at_the_minimum():
    c = cfg(oom__min_batch_size=2, restart__max_restarts=1)
    s, _ = decide(Sup(), Start(batch_size=6, n_proc_da=8), 0, c)
    seen = []
    for t in range(1, 5):
        s, acts = decide(s, ChildExited(Exit(1, OOM)), t, c)
        seen += [(a.old, a.new) for a in acts if isinstance(a, SetBatchSize)]
        s, acts = decide(s, Tick(), t + 100, c)
        assert acts == []  # no restart before the plans file says the new size
        s, acts = decide(s, BatchSizeSet(*seen[-1]), t + 100, c)
        s, acts = decide(s, Tick(), t + 200, c)
        assert InspectCheckpoints() in acts
    assert seen == [(6, 5), (5, 4), (4, 3), (3, 2)]
    assert s.restart_times == () and s.original_batch_size == 6 and s.batch_size == 2
    s, acts = decide(s, ChildExited(Exit(-signal.SIGABRT, OOM)), 200, c)
    assert s.state == State.FAILED and s.exit_code == EXIT_GAVE_UP
    assert "minimum batch size 2" in s.message and "6 -> 5 -> 4 -> 3 -> 2" in s.message


def test_host_oom_halves_workers_then_counts_as_a_restart():
    c = cfg()
    s, _ = decide(Sup(), Start(batch_size=2, n_proc_da=8), 0, c)
    got = []
    for t in range(3):
        s, acts = decide(s, ChildExited(Exit(1, HOST)), t, c)
        got += [(a.old, a.new) for a in acts if isinstance(a, SetWorkers)]
        s, _ = decide(s, Tick(), t + 100, c)
    assert got == [(8, 4), (4, 2), (2, 1)] and s.restart_times == ()
    s, acts = decide(s, ChildExited(Exit(-signal.SIGKILL)), 300, c)
    assert not any(isinstance(a, SetWorkers) for a in acts) and s.state == State.BACKOFF
    s, _ = decide(s, Tick(), 1000, c)
    assert len(s.restart_times) == 1  # this one counted


def test_a_lower_worker_count_from_an_earlier_run_stays():
    c = cfg()
    s, _ = decide(Sup(n_proc_da=2), Start(batch_size=2, n_proc_da=8), 0, c)
    assert s.n_proc_da == 2


def test_oom_disabled_is_an_ordinary_restart():
    c = cfg(oom__enabled=False)
    s, _ = decide(Sup(), Start(batch_size=None), 0, c)
    s, acts = decide(s, ChildExited(Exit(1, OOM)), 1, c)
    assert not any(isinstance(a, SetBatchSize) for a in acts) and s.state == State.BACKOFF


# ---- with the fake trainer --------------------------------------------------------------------------
def set_plan_bs(job, bs):
    doc = json.loads(job.plans.read_text())
    doc["configurations"]["3d_fullres"]["batch_size"] = bs
    job.plans.write_text(json.dumps(doc, indent=4))


def test_fake_trainer_ooms_above_2_from_6_reaches_2_and_finishes(job):
    set_plan_bs(job, 6)
    original = job.plans.read_text()
    cfg_path = job.config(env={"FAKE_OOM_ABOVE_BS": "2", "FAKE_EPOCHS": "4"}, restart={"max_restarts": 1})
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["cuda_oom"] * 4 + ["completed"]
    assert [(c["old"], c["new"]) for c in st["changes"]] == [(6, 5), (5, 4), (4, 3), (3, 2)]
    assert json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 2
    assert (job.plans.parent / ("nnUNetPlans.json" + BACKUP_SUFFIX)).read_text() == original
    assert st["sup"]["original_batch_size"] == 6 and st["sup"]["restart_times"] == []
    assert "batch_size_reduced" in out

    from supervisor.config import loader as config
    from supervisor.commands import status
    info = status.gather(config.load(cfg_path))
    assert (info["batch_size"], info["original_batch_size"], info["min_batch_size"]) == (2, 6, 1)


def test_oom_at_the_minimum_gives_up_with_advice(job):
    set_plan_bs(job, 2)
    cfg_path = job.config(env={"FAKE_OOM_ABOVE_BS": "0"}, oom={"min_batch_size": 1, "strategy": "multiply"})
    rc, out = job.run(cfg_path)
    assert rc == 3, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["cuda_oom", "cuda_oom"]
    assert "minimum batch size 1" in st["sup"]["message"] and "3d_lowres" in st["sup"]["message"]


def test_host_oom_restarts_with_fewer_workers(job):
    cfg_path = job.config(env={"FAKE_FAULT": "1:hostoom", "FAKE_EPOCHS": "3", "nnUNet_n_proc_DA": "6"})
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["host_oom", "completed"]
    assert st["changes"] == [dict(st["changes"][0], what="nnUNet_n_proc_DA", old=6, new=3)]
    assert "n_proc_DA: 3" in open(st["attempts"][1]["log"]).read()  # the trainer really got 3


def test_bad_plans_at_start_up_exit_2_and_file_untouched(job):
    job.plans.write_text('{"configurations": {"3d_fullres": {"batch_size": "two"}}}')
    rc, out = job.run(job.config())
    assert rc == 2 and "configurations.3d_fullres.batch_size" in out and str(job.plans) in out
    assert "Traceback" not in out
    assert job.plans.read_text() == '{"configurations": {"3d_fullres": {"batch_size": "two"}}}'
    assert not (job.state / "state.json").exists()


def test_min_batch_size_above_the_plan_is_rejected(job):
    rc, out = job.run(job.config(oom={"min_batch_size": 4}))
    assert rc == 2 and "oom.min_batch_size" in out and "batch size 2" in out
