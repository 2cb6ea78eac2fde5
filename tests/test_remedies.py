"""Failures nnU-Net users hit, recognised from their evidence and met with their remedy (issue 23):
torch.compile failures, dead augmentation workers, GPU hardware errors, NaN from the first epochs.

The evidence is real where a CPU can produce it: tests/fixtures/real_nnunet_compile_no_cxx.txt and
real_nnunet_workers_died.txt are nnUNetv2_train 2.8.1's stderr on this machine (the demo trainers
nnUNetTrainerDemoCompile with CXX=/nonexistent/g++, and nnUNetTrainerDemoWorkerDeath with two workers).
GPU hardware errors cannot be produced here: those tests feed NVML's real return types and exceptions to
the adapter (tests/test_gpu_health.py) and GpuFaults events to the policy (here).
"""
import json
import signal
from pathlib import Path

import pytest

from supervisor.core.actions import Finish, SetCompile, SetWorkers, SignalGroup
from supervisor.core.classify import Exit, Reason, classify
from supervisor.core.events import ChildExited, EpochDone, EpochStarted, GpuFaults, Start, Tick
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from supervisor.integrations import notices
from test_policy import cfg, rec, running

FIX = Path(__file__).parent / "fixtures"
COMPILE = (FIX / "real_nnunet_compile_no_cxx.txt").read_text()
WORKERS = (FIX / "real_nnunet_workers_died.txt").read_text()


# ---- evidence ---------------------------------------------------------------------------------------------
def test_real_nnunet_evidence_is_recognised():
    assert classify(Exit(1, COMPILE)) == Reason.COMPILE_ERROR
    assert classify(Exit(1, WORKERS)) == Reason.WORKERS_DIED
    # the kernel's OOM killer took a worker (cgroup memory.events): host RAM, the workers are halved at once
    assert classify(Exit(1, WORKERS, oom_kills_delta=1)) == Reason.HOST_OOM


@pytest.mark.parametrize("line", [
    "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:",
    "torch._inductor.exc.InductorError: CppCompileError: C++ compile error",
    "RuntimeError: Failed to find C compiler. Please specify via CC environment variable.",
    "triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 131072, Hardware limit: 101376",
    "triton.compiler.errors.CompilationError: at 12:8:",
    "/tmp/tmpabc/main.c:5:10: fatal error: Python.h: No such file or directory",
])
def test_compile_failures_of_every_stage_are_compile_errors(line):
    tail = f"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{line}\n"
    assert classify(Exit(1, tail)) == Reason.COMPILE_ERROR


def test_a_cuda_oom_during_compilation_is_an_oom_first():
    """Inductor's autotuning can run out of GPU memory: a smaller batch is that remedy, not compile off."""
    tail = ("torch._inductor.exc.InductorError: OutOfMemoryError: CUDA out of memory. Tried to allocate "
            "2.00 GiB\n")
    assert classify(Exit(1, tail)) == Reason.CUDA_OOM


def test_workers_died_after_a_real_error_is_that_error():
    """The workers' death is a consequence when the main thread died of something else first."""
    tail = ("Traceback (most recent call last):\n  File \"t.py\", line 3, in train_step\n"
            "RuntimeError: CUDA error: an illegal memory access was encountered\n" + WORKERS)
    assert classify(Exit(1, tail)) == Reason.CRASH
    segv = "Fatal Python error: Segmentation fault\n\nCurrent thread 0x00007f (most recent call first):\n" + WORKERS
    assert classify(Exit(-signal.SIGSEGV, segv)) == Reason.CRASH


# ---- torch.compile ------------------------------------------------------------------------------------------
def test_a_compile_failure_restarts_once_without_compile_not_counted_then_is_a_crash():
    c = cfg(restart__max_restarts=1)
    s = running(c)
    s, acts = decide(s, ChildExited(Exit(1, COMPILE)), 1, c)
    assert s.state == State.BACKOFF and s.compile_off and s.restart_counts is False
    assert [a for a in acts if isinstance(a, SetCompile)][0].why.startswith("torch._inductor.exc.InductorError")
    s, _ = decide(s, Tick(), 100, c)
    assert s.state == State.RUNNING and s.restart_times == ()
    # compile is off now: the same error again (a trainer that compiles by itself) is an ordinary crash,
    # and the crash budget ends it: never a loop with compile on
    s, acts = decide(s, ChildExited(Exit(1, COMPILE)), 101, c)
    assert s.state == State.BACKOFF and not any(isinstance(a, SetCompile) for a in acts)
    s, _ = decide(s, Tick(), 200, c)
    s, _ = decide(s, ChildExited(Exit(1, COMPILE)), 201, c)
    assert s.state == State.FAILED and s.exit_code == ExitCode.GAVE_UP
    assert 'training.compile = "off"' in s.message


def test_compile_forced_on_is_never_turned_off():
    c = cfg(training__compile="on")
    s, acts = decide(running(c), ChildExited(Exit(1, COMPILE)), 1, c)
    assert s.state == State.BACKOFF and not s.compile_off and s.restart_counts
    assert not any(isinstance(a, SetCompile) for a in acts)


def test_compile_off_carries_over_to_a_new_run_of_the_supervisor():
    c = cfg()
    s, _ = decide(running(c), ChildExited(Exit(1, COMPILE)), 1, c)
    s, _ = decide(s, Start(), 2, c)
    assert s.compile_off


def test_compile_setting_and_environment_cannot_both_say(tmp_path):
    from supervisor.config.loader import ConfigError
    with pytest.raises(ConfigError, match="training.compile.*environment.nnUNet_compile"):
        cfg(training__compile="off", environment__nnUNet_compile="t")


def test_the_notification_says_what_was_decided():
    c = cfg()
    s, acts = decide(running(c), ChildExited(Exit(1, COMPILE)), 1, c)
    kind, fields = next(n for n in map(notices.notice_for, acts) if n)
    text = notices.body(kind, fields, {"sup": {"restarts": 0}})["message"]
    assert kind == "compile_error"
    assert "torch.compile failed in attempt 1 (torch._inductor.exc.InductorError: InvalidCxxCompiler" in text
    assert "nnUNet_compile=f for the rest of this job" in text


# ---- dead augmentation workers ------------------------------------------------------------------------------
def test_workers_dying_restart_first_then_halve_down_to_one_then_count():
    c = cfg(restart__max_restarts=3)
    s, _ = decide(Sup(), Start(batch_size=2, n_proc_da=4), 0, c)
    lowered, t = [], 1
    for _ in range(6):
        s, acts = decide(s, ChildExited(Exit(1, WORKERS)), t, c)
        lowered += [(a.old, a.new) for a in acts if isinstance(a, SetWorkers)]
        if s.state != State.BACKOFF:
            break
        s, _ = decide(s, Tick(), t + 70, c)  # past any backoff, all within the 10 min budget window
        t += 71
    # restart, halve, restart, halve, then counted restarts at one worker until the budget is spent
    assert lowered == [(4, 2), (2, 1)]
    assert s.state == State.FAILED and s.exit_code == ExitCode.GAVE_UP
    assert "/dev/shm" in s.message and "last reason: workers_died" in s.message
    assert s.restart_reasons == {"workers_died": 5}


def test_the_workers_notification_names_the_change():
    c = cfg()
    s, _ = decide(Sup(), Start(batch_size=2, n_proc_da=4), 0, c)
    s, acts = decide(s, ChildExited(Exit(1, WORKERS)), 1, c)
    first = notices.body(*next(n for n in map(notices.notice_for, acts) if n), {})["message"]
    s, _ = decide(s, Tick(), 1000, c)
    s, acts = decide(s, ChildExited(Exit(1, WORKERS)), 1001, c)
    second = notices.body(*next(n for n in map(notices.notice_for, acts) if n), {})["message"]
    assert "augmentation workers died" in first and "fewer workers if it happens again" in first
    assert "nnUNet_n_proc_DA 4 -> 2" in second


# ---- NaN from the first epochs ------------------------------------------------------------------------------
def _diverge(c, first_epoch: int, budget_spent: bool):
    s = running(c)
    if budget_spent:  # the crash budget is used up: divergence must not need any of it
        s = s.__class__(**{**s.__dict__, "restart_times": (0.0,) * 5})
    for e in range(first_epoch):
        s, _ = decide(s, EpochDone(rec(e, 0.1)), e, c)
        s, _ = decide(s, EpochStarted(e + 1), e, c)
    for e in range(first_epoch, first_epoch + c.target.max_nonfinite_epochs):
        s, _ = decide(s, EpochDone(rec(e, float("nan"), dice=(float("nan"), float("nan")))), e, c)
        if s.state == State.STOP_PENDING:
            s, _ = decide(s, EpochStarted(e + 1), e, c)
    assert s.state == State.STOPPING
    return decide(s, ChildExited(Exit(-signal.SIGINT)), 99, c)


@pytest.mark.parametrize("budget_spent", [False, True])
def test_nan_from_the_first_epochs_stops_for_good_and_says_check_the_data(budget_spent):
    c = cfg(target__max_nonfinite_epochs=3)
    s, acts = _diverge(c, 0, budget_spent)
    assert s.state == State.FAILED and s.outcome == "diverged" and s.exit_code == ExitCode.GAVE_UP
    assert "from epoch 0" in s.message and "check the data" in s.message
    assert "--verify_dataset_integrity" in s.message
    assert Finish(int(ExitCode.GAVE_UP)) in acts


def test_nan_after_good_epochs_names_the_learning_rate_too():
    c = cfg(target__max_nonfinite_epochs=3)
    s, _ = _diverge(c, 6, False)
    assert s.outcome == "diverged" and "from epoch 6" in s.message
    assert "learning rate" in s.message and "--verify_dataset_integrity" not in s.message


# ---- GPU hardware errors ------------------------------------------------------------------------------------
ECC = (("0", "2 uncorrectable ECC errors since the run began"),)


def test_a_gpu_fault_stops_at_the_safe_point_and_ends_failed_never_restarted():
    c = cfg(restart__max_restarts=10)
    s = running(c)
    s, _ = decide(s, EpochDone(rec(0, 0.1)), 1, c)  # a checkpoint write may be running now
    s, acts = decide(s, GpuFaults(ECC), 2, c)
    assert s.state == State.STOP_PENDING and s.stop_reason == Reason.GPU_FAULT
    assert s.gpu_faults == {"0": ECC[0][1]}
    s, acts = decide(s, EpochStarted(1), 3, c)  # the safe point: SIGINT
    assert SignalGroup(signal.SIGINT) in acts
    s, acts = decide(s, ChildExited(Exit(-signal.SIGINT)), 4, c)
    assert s.state == State.FAILED and s.outcome == "gpu_unhealthy" and s.exit_code == ExitCode.GAVE_UP
    assert "GPU 0: 2 uncorrectable ECC errors" in s.message
    assert s.to_json(4, 1000)["unhealthy_gpus"] == [0]
    kind, fields = next(n for n in map(notices.notice_for, acts) if n)
    assert kind == "gpu_unhealthy"
    assert "not restarted on it" in notices.body(kind, fields, {})["message"]


def test_a_gpu_fault_while_waiting_to_restart_ends_at_once():
    c = cfg()
    s, _ = decide(running(c), ChildExited(Exit(1, "RuntimeError: boom")), 1, c)
    assert s.state == State.BACKOFF
    s, _ = decide(s, GpuFaults(ECC), 2, c)
    assert s.state == State.FAILED and s.outcome == "gpu_unhealthy"


def test_a_fault_during_another_stop_keeps_that_outcome_or_prevents_the_restart():
    c = cfg()
    s = running(c)
    s, _ = decide(s, EpochDone(rec(0, 0.9)), 1, c)  # target reached: a stop is pending
    s, _ = decide(s, GpuFaults(ECC), 2, c)
    s, _ = decide(s, EpochStarted(1), 3, c)
    s, _ = decide(s, ChildExited(Exit(-signal.SIGINT)), 4, c)
    assert s.outcome == "target_reached" and s.gpu_faults  # reached is reached; the GPU stays marked
    s = running(c)
    s, _ = decide(s, GpuFaults(ECC), 1, c)  # nothing being written: SIGINT at once
    s, _ = decide(s, ChildExited(Exit(1, "RuntimeError: died meanwhile")), 2, c)
    assert s.state == State.FAILED and s.outcome == "gpu_unhealthy"


def test_the_same_fault_reported_again_is_not_news():
    c = cfg()
    s, _ = decide(running(c), GpuFaults(ECC), 1, c)
    s2, acts = decide(s, GpuFaults(ECC), 2, c)
    assert s2 == s and acts == []


def test_unhealthy_gpus_survive_state_json():
    s = Sup(gpu_faults={"1": "Xid 79"})
    d = json.loads(json.dumps(s.to_json(0, 100)))
    assert d["unhealthy_gpus"] == [1] and Sup.from_json(d, 0, 100).gpu_faults == {"1": "Xid 79"}
    with pytest.raises(ValueError, match="gpu_faults"):
        Sup.from_json({**d, "gpu_faults": {"1": 7}}, 0, 100)


# ---- with the fake trainer, real processes ------------------------------------------------------------------
def test_fake_trainer_compile_failure_then_trains_without_compile(job):
    cfg_path = job.config(env={"FAKE_FAULT": "1:compile", "FAKE_EPOCHS": "3"})
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    st = job.state_json()
    assert st["sup"]["outcome"] == "completed" and st["sup"]["compile_off"] is True
    assert [a["reason"] for a in st["attempts"]] == ["compile_error", "completed"]
    ch = [c for c in st["changes"] if c["what"] == "nnUNet_compile"]
    assert ch and ch[0]["new"] == "f" and ch[0]["revert"] == 'training.compile = "on"'
    assert "nnUNet_compile" in out and "compile_turned_off" in out


def test_fake_trainer_workers_dying_twice_get_fewer_workers(job):
    cfg_path = job.config(env={"FAKE_FAULT": "1:workers", "FAKE_EPOCHS": "3", "nnUNet_n_proc_DA": "2"})
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["workers_died", "workers_died", "completed"]
    assert [(c["old"], c["new"]) for c in st["changes"] if c["what"] == "nnUNet_n_proc_DA"] == [(2, 1)]
    assert st["sup"]["n_proc_da"] == 1


def test_a_fault_seen_by_a_run_that_died_mid_stop_is_not_forgotten():
    """A watchdog kill during the safe-point wait: the next run's health baseline already holds the fault
    (never reported again), so the state's record decides: not restarted on that GPU."""
    c = cfg()
    s, _ = decide(running(c), EpochDone(rec(0, 0.1)), 1, c)
    s, _ = decide(s, GpuFaults(ECC), 2, c)
    assert s.state == State.STOP_PENDING
    s, acts = decide(s, Start(), 3, c)  # the supervisor was SIGKILLed and systemd started it again
    assert s.state == State.FAILED and s.outcome == "gpu_unhealthy"
    # after the job ended gpu_unhealthy, a start is the operator's decision: it runs
    s, _ = decide(s, Start(), 4, c)
    assert s.state == State.RUNNING and s.gpu_faults == {}


def test_a_fault_while_taking_over_another_trainer_ends_unhealthy_instead_of_starting_ours():
    c = cfg()
    s, _ = decide(Sup(), Start(others=((4242, "nnUNetv2_train D 3d_fullres 0", "", ""),), take_over=True), 0, c)
    assert s.taking_over
    s, _ = decide(s, GpuFaults(ECC), 1, c)
    s, _ = decide(s, ChildExited(Exit(None)), 2, c)
    assert s.state == State.FAILED and s.outcome == "gpu_unhealthy"


@pytest.mark.parametrize("name", ["repeated", "cut_off_tracebacks", "long_traceback", "huge_line", "nul_bytes"])
def test_a_hostile_workers_died_tail_is_judged_in_bounded_time(name):
    """The workers' message in tails built to make the traceback walk slow or confused: judged the same
    (nothing else in them), in well under a second."""
    import time
    w = "RuntimeError: One or more background workers are no longer alive. Exiting."
    tb = "Traceback (most recent call last):\n"
    tail = {"repeated": (tb + "  x\n" + w + "\n") * 3000,
            "cut_off_tracebacks": (tb + "  x\n") * 3000 + w + "\n",
            "long_traceback": tb + "  x\n" * 60000 + w + "\n",
            "huge_line": tb + "  " + "x" * 5_000_000 + "\n" + w + "\n",
            "nul_bytes": (tb + "  \0\n" + w + "\0\n") * 2000}[name]
    t = time.perf_counter()
    assert classify(Exit(1, tail)) == Reason.WORKERS_DIED
    assert time.perf_counter() - t < 2.0


def test_the_next_trainers_environment_is_the_policys_decision():
    from supervisor.core.criteria import trainer_overrides
    s = Sup(n_proc_da=2, compile_off=True, export_procs=4)
    assert trainer_overrides(s, cfg()) == {"nnUNet_n_proc_DA": "2", "nnUNet_compile": "f", "nnUNet_def_n_proc": "4"}
    # compile forced on again in config.toml (the revert): the remedy no longer applies
    assert "nnUNet_compile" not in trainer_overrides(s, cfg(training__compile="on"))
    assert trainer_overrides(Sup(), cfg()) == {}


def test_a_compile_that_fails_on_a_full_disk_is_a_full_disk_not_compile_off():
    """The inductor/Triton caches live in the state dir: ENOSPC while compiling waits for room (disk_full)
    instead of turning compile off for good."""
    tail = ("torch._inductor.exc.InductorError: OSError: [Errno 28] No space left on device: "
            "'/var/lib/cardiacseg-train/compile-cache/inductor/fxgraph/ab/tmp'\n")
    assert classify(Exit(1, tail)) == Reason.DISK_FULL
