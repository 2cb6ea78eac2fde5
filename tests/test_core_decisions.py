"""Decisions that moved from the adapters into the core, each as the pure function it now is: the checkpoint
--c resumes from, reaping an ended attempt, another trainer on the fold, the queue's own table, and the
one restart count that status, metrics, notifications and the status line all show."""
import signal

import pytest

from supervisor.core import queue_policy as qp
from supervisor.core.actions import (Adopt, CollectExit, Finish, KillRemnants, Log, MoveAside, RemoveStaleTemps,
                                     SignalGroup, Spawn, StateChanged)
from supervisor.core.classify import Exit, Reason
from supervisor.core.events import (CheckpointsInspected, ChildExited, EpochDone, EpochStarted, Remnants, Start,
                                    Tick, TrainerExited)
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from supervisor.core.status_line import summary_line
from test_policy import cfg, rec

LATEST, BEST, FINAL = "checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth"


def starting(c):
    s, _ = decide(Sup(), Start(), 0, c)
    return s


# ---- which checkpoint --c resumes from -----------------------------------------------------------------------
def test_a_readable_latest_is_resumed_with_c():
    c = cfg()
    s, acts = decide(starting(c), CheckpointsInspected(((LATEST, None), (BEST, None))), 1, c)
    assert acts == [Spawn(LATEST, resume=True)] and s.resume_from == LATEST


def test_no_checkpoint_at_all_starts_fresh_without_c():
    c = cfg()
    s, acts = decide(starting(c), CheckpointsInspected(()), 1, c)
    assert acts == [Spawn(None, resume=False)]


def test_unreadable_ones_before_the_first_good_are_moved_aside_and_the_loss_is_named():
    c = cfg()
    s, acts = decide(starting(c), CheckpointsInspected(((LATEST, "truncated"), (BEST, None)), ("."
                                                       "checkpoint_latest.pth.tmp-99",), last_epoch=9,
                                                       best_epoch=6), 1, c)
    assert acts[0] == RemoveStaleTemps((".checkpoint_latest.pth.tmp-99",))
    assert acts[-1] == Spawn(BEST, resume=True, move_aside=((LATEST, "truncated"),))  # moved, or no trainer
    fallback = next(a for a in acts if isinstance(a, Log) and a.event == "checkpoint_fallback")
    assert fallback.fields["epochs_lost"] == 3


def test_the_file_the_last_attempt_died_loading_is_suspect_whatever_verify_says():
    c = cfg()
    s, _ = decide(running(c), ChildExited(Exit(1, "RuntimeError: PytorchStreamReader failed reading zip archive")), 1,
                  c)
    assert s.last_reason == Reason.CORRUPT_CHECKPOINT and s.suspect is None      # nothing was resumed yet
    s = Sup(state=State.BACKOFF, attempt=1, restart_at=5.0, suspect=LATEST, last_reason=Reason.CORRUPT_CHECKPOINT)
    s, _ = decide(s, Tick(), 6, c)
    s, acts = decide(s, CheckpointsInspected(((LATEST, None), (BEST, None))), 6, c)
    assert acts[-1] == Spawn(BEST, resume=True, move_aside=((LATEST, "the previous attempt died loading it"),))
    assert s.suspect is None                                                     # judged once


def test_a_supervisor_restart_never_makes_a_good_checkpoint_suspect():
    """Review finding: a corrupt latest, resumed from best, then the supervisor killed: the next run moved the
    good best aside as "the file the last attempt died loading" and gave up."""
    c = cfg()
    s = Sup(state=State.BACKOFF, attempt=1, restart_at=5.0, suspect=LATEST, last_reason=Reason.CORRUPT_CHECKPOINT)
    s, _ = decide(s, Tick(), 6, c)
    s, _ = decide(s, CheckpointsInspected(((LATEST, None), (BEST, None))), 6, c)  # latest aside, best resumed
    s = Sup.from_json(s.to_json(7, 1e9), 7, 1e9)                                  # SIGKILL; a new run reads it
    s, _ = decide(s, Start(), 8, c)
    s, acts = decide(s, CheckpointsInspected(((BEST, None),)), 9, c)
    assert acts[-1] == Spawn(BEST, resume=True) and s.state == State.RUNNING


def test_nothing_readable_left_gives_up_unless_a_fresh_start_is_allowed():
    c = cfg()
    s, acts = decide(starting(c), CheckpointsInspected(((LATEST, "bad"), (BEST, "bad"))), 1, c)
    assert s.state == State.FAILED and s.exit_code == ExitCode.GAVE_UP and Finish(ExitCode.GAVE_UP) in acts
    assert [a for a in acts if isinstance(a, MoveAside)] == [MoveAside(LATEST, "bad"), MoveAside(BEST, "bad")]
    c = cfg(checkpoint__allow_fresh_start=True)
    s, acts = decide(starting(c), CheckpointsInspected(((LATEST, "bad"),)), 1, c)
    assert acts[-1] == Spawn(None, resume=False, move_aside=((LATEST, "bad"),)) and s.state == State.RUNNING


def test_the_final_validation_runs_with_val_and_without_c():
    c = cfg()
    s, _ = decide(Sup(), Start(final_checkpoint=True), 0, c)
    s, acts = decide(s, CheckpointsInspected(((FINAL, None),)), 1, c)
    assert acts == [Spawn(FINAL, resume=False, validate_only=True)]


def test_a_stop_decided_before_the_trainer_started_ends_without_one():
    c = cfg()
    s, _ = decide(starting(c), Tick(), 1, c)
    from supervisor.core.events import Signalled
    s, _ = decide(s, Signalled("SIGTERM"), 1, c)
    assert s.state == State.STOPPING
    s, acts = decide(s, CheckpointsInspected(((LATEST, None),)), 2, c)
    assert s.state == State.DONE and s.outcome == "stopped" and not any(isinstance(a, Spawn) for a in acts)


# ---- reaping: deadlines in the state record --------------------------------------------------------------------
def running(c):
    s, _ = decide(starting(c), CheckpointsInspected(()), 0, c)
    return s


def test_an_exit_kills_the_remnants_and_waits_for_them_bounded():
    c = cfg(oom__gpu_release_timeout_seconds=20)
    s, acts = decide(running(c), TrainerExited(1), 10, c)
    assert acts == [KillRemnants()] and s.exited and s.reap_deadline == 40
    s2, acts = decide(s, Remnants(alive=2, streams_open=True), 11, c)
    assert acts == [] and s2 == s                                   # still going: wait
    s3, acts = decide(s, Remnants(alive=0, streams_open=False), 12, c)
    assert acts == [CollectExit()] and s3.reap_deadline is None     # all gone: collect the evidence
    s4, acts = decide(s, Remnants(alive=1), 41, c)                   # past the deadline: go on, said once
    assert [a.event for a in acts if isinstance(a, Log)] == ["group_not_empty"] and acts[-1] == CollectExit()


def test_gpu_memory_still_held_is_waited_for_then_given_up_on():
    c = cfg(oom__gpu_release_timeout_seconds=20)
    s, _ = decide(running(c), TrainerExited(-9), 10, c)
    s, acts = decide(s, Remnants(gpu_holders=(77,)), 11, c)
    assert [a.event for a in acts] == ["waiting_for_gpu_memory"] and s.gpu_deadline == 31
    s2, acts = decide(s, Remnants(gpu_holders=(77,)), 20, c)
    assert acts == []
    s2, acts = decide(s, Remnants(gpu_holders=(77,)), 31, c)
    assert [a.event for a in acts if isinstance(a, Log)] == ["gpu_memory_still_held"] and acts[-1] == CollectExit()


def test_remnants_before_an_exit_mean_nothing():
    c = cfg()
    s = running(c)
    assert decide(s, Remnants(alive=3), 5, c) == (s, [])


# ---- another trainer on the fold -------------------------------------------------------------------------------
OTHER = ((4242, "nnUNetv2_train Dataset001_X 3d_fullres 0 --c"),)


def test_another_trainer_is_refused_naming_it():
    c = cfg()
    s, acts = decide(Sup(), Start(others=OTHER), 0, c)
    assert s.state == State.FAILED and s.exit_code == ExitCode.CONFIG
    assert "pid 4242" in s.message and "--take-over" in s.message and not any(isinstance(a, Adopt) for a in acts)


def test_take_over_is_the_ordinary_stop_at_the_safe_point_then_ours_with_c():
    c = cfg()
    s, acts = decide(Sup(), Start(others=OTHER, take_over=True), 0, c)
    assert s.state == State.STOP_PENDING and s.taking_over and Adopt((4242,)) in acts
    assert SignalGroup(signal.SIGCONT) in acts
    s, acts = decide(s, EpochDone(rec(7, 0.3)), 1, c)               # its checkpoint saves follow: wait
    assert s.state == State.STOP_PENDING
    s, acts = decide(s, EpochStarted(8), 2, c)                     # its safe point: SIGINT
    assert s.state == State.STOPPING and SignalGroup(signal.SIGINT) in acts
    s, acts = decide(s, ChildExited(Exit(None)), 3, c)              # gone: our own attempt, --c
    assert s.state == State.RUNNING and not s.taking_over and s.restarts == 0
    assert [(a.old, a.new, a.cause) for a in acts if isinstance(a, StateChanged)] == [("stopping", "running",
                                                                                       "take_over")]


def test_a_take_over_stopped_by_the_operator_meanwhile_ends_there():
    from supervisor.core.events import Signalled
    c = cfg()
    s, _ = decide(Sup(), Start(others=OTHER, take_over=True), 0, c)
    s, acts = decide(s, Signalled("SIGTERM"), 1, c)                 # noted: its checkpoint may be being written
    assert s.state == State.STOP_PENDING and s.stop_asked
    s, _ = decide(s, EpochStarted(8), 2, c)
    s, acts = decide(s, ChildExited(Exit(None)), 3, c)
    assert s.state == State.DONE and s.outcome == "stopped"


# ---- the queue's own decisions ---------------------------------------------------------------------------------
def qcfg(**kw):
    return cfg(queue__folds=[0, 1, 2], **kw)


def queue(c, slots=("0", "1")):
    q = qp.Queue(order=tuple(qp.jobs(c)), slots=slots, status={j.key: "pending" for j in qp.jobs(c)})
    return qp.decide_queue(q, qp.QStart(), 0, c)


def test_the_queue_fills_its_slots_in_order():
    q, acts = queue(qcfg())
    assert [a for a in acts if isinstance(a, qp.Launch)] == [qp.Launch("3d_fullres/0", "0"),
                                                             qp.Launch("3d_fullres/1", "1")]


def test_a_dead_job_supervisor_is_started_again_after_backoff_and_within_its_budget():
    c = qcfg(restart__backoff_seconds=10)
    q, _ = queue(c)
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/0", -9, False), 5, c)
    assert q.retry_at["3d_fullres/0"] == 15 and [a.event for a in acts if isinstance(a, Log)] == [
        "queue_job_supervisor_died"]
    # its slot stays its own (its trainer may still be on that GPU): nothing else starts there
    assert not any(isinstance(a, qp.Launch) for a in acts) and q.slot_of["3d_fullres/0"] == "0"
    q, acts = qp.decide_queue(q, qp.QTick(), 10, c)
    assert acts == []                                               # backoff not over
    q, acts = qp.decide_queue(q, qp.QTick(), 15, c)
    assert acts == [qp.Launch("3d_fullres/0", "0")]
    for n in range(qp.CHILD_RETRIES - 1):
        q, _ = qp.decide_queue(q, qp.JobExited("3d_fullres/0", -9, False), 100 + n, c)
        q, _ = qp.decide_queue(q, qp.QTick(), 1000 + n, c)
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/0", -9, False), 2000, c)
    assert q.status["3d_fullres/0"] == "failed" and q.retries["3d_fullres/0"] == qp.CHILD_RETRIES
    assert qp.Launch("3d_fullres/2", "0") in acts                   # now the slot is free


def test_a_stop_during_a_retry_backoff_ends_the_queue():
    c = qcfg(restart__backoff_seconds=10)
    q, _ = queue(c)
    q, _ = qp.decide_queue(q, qp.JobExited("3d_fullres/0", -9, False), 5, c)
    q, acts = qp.decide_queue(q, qp.QSignalled("SIGTERM"), 6, c)
    assert q.status["3d_fullres/0"] == "failed" and qp.Forward("SIGTERM") in acts
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/1", 0, False), 7, c)
    assert q.state == qp.QState.DONE and acts[-1] == qp.QFinish(ExitCode.GAVE_UP)


def test_a_cascade_fold_whose_lowres_fold_failed_is_skipped_not_waited_for_forever():
    c = cfg(queue__folds=[0], queue__configurations=["3d_lowres", "3d_cascade_fullres"])
    q, acts = queue(c, slots=("0",))
    assert acts == [qp.Launch("3d_lowres/0", "0")]
    q, acts = qp.decide_queue(q, qp.JobExited("3d_lowres/0", ExitCode.GAVE_UP, False), 1, c)
    assert q.status["3d_cascade_fullres/0"] == "skipped" and q.state == qp.QState.DONE
    assert acts[-1] == qp.QFinish(ExitCode.GAVE_UP)


def test_a_config_error_stops_the_queue_and_the_others_are_told():
    c = qcfg()
    q, _ = queue(c)
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/0", ExitCode.CONFIG, False), 1, c)
    assert q.state == qp.QState.STOPPING and qp.Forward("SIGTERM") in acts
    assert not any(isinstance(a, qp.Launch) for a in acts)
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/1", 0, False), 2, c)
    assert q.state == qp.QState.DONE and acts[-1] == qp.QFinish(ExitCode.CONFIG)
    assert q.status == {"3d_fullres/0": "config_error", "3d_fullres/1": "stopped", "3d_fullres/2": "pending"}


@pytest.mark.parametrize("on_give_up, stops", [("continue", False), ("stop", True)])
def test_a_give_up_continues_or_stops_the_queue(on_give_up, stops):
    c = qcfg(queue__on_give_up=on_give_up)
    q, _ = queue(c)
    q, acts = qp.decide_queue(q, qp.JobExited("3d_fullres/0", ExitCode.GAVE_UP, False), 1, c)
    assert (q.state == qp.QState.STOPPING) == stops
    assert (qp.Launch("3d_fullres/2", "0") in acts) != stops


def test_queue_signals_mean_what_they_mean_to_a_single_job():
    c = qcfg()
    q, _ = queue(c)
    q2, acts = qp.decide_queue(q, qp.QSignalled("SIGUSR1"), 1, c)
    assert q2 == q and [a.event for a in acts] == ["signal_ignored"]      # outside SLURM: nothing
    q2, acts = qp.decide_queue(q, qp.QSignalled("SIGHUP"), 1, c)
    assert q2 == q and acts == [qp.Forward("SIGHUP")]
    q2, acts = qp.decide_queue(q, qp.QSignalled("SIGUSR1", in_slurm=True), 1, c)
    assert q2.state == qp.QState.STOPPING and qp.Forward("SIGUSR1") in acts
    q3, acts = qp.decide_queue(q2, qp.QSignalled("SIGTERM"), 2, c)  # again: forwarded (each job escalates)
    assert acts == [qp.Forward("SIGTERM")]


def test_every_queue_pair_has_an_entry():
    assert set(qp.QUEUE_TABLE) == {(s, e) for s in qp.QState for e in qp.QEVENTS}


# ---- one restart count -----------------------------------------------------------------------------------------
def test_status_metrics_notifications_and_the_status_line_show_the_same_restart_count(tmp_path):
    from supervisor.commands.status import restart_count
    from supervisor.integrations import metrics, notices
    c = cfg(restart__backoff_seconds=10, restart__max_restarts=5)
    s = running(c)
    for t in (10, 100, 200):
        s, _ = decide(s, ChildExited(Exit(1, "RuntimeError: boom")), t, c)
        s, _ = decide(s, Tick(), t + 60, c)
        s, _ = decide(s, CheckpointsInspected(()), t + 60, c)
    s, acts = decide(s, ChildExited(Exit(1, "RuntimeError: boom")), 300, c)
    snap = {"sup": s.to_json(300, 1e9), "job": {}, "settings": {}, "epochs": [], "attempts": [{}] * 9}
    assert s.restarts == 3 and restart_count(snap["sup"]) == (3, {"crash": 3})
    fams = {f.name: f for f in metrics.families(snap)}
    assert sum(x.value for x in fams["cardiacseg_train_restarts"].samples if x.name.endswith("_total")) == 3
    change = next(a for a in acts if isinstance(a, StateChanged))
    kind, fields = notices.notice_for(change)
    b = notices.body(kind, fields, snap)
    assert b["restarts"] == 3 and "restart 4 in" in b["message"]       # what the policy decided: the 4th
    assert "before restart 4 after crash" in summary_line(s, None, c, 300)


def test_a_trainer_that_dies_while_a_requested_stop_waits_is_not_restarted():
    """Review finding: SIGTERM arrived while the ended attempt was being reaped; the crash was restarted."""
    from supervisor.core.events import Signalled
    c = cfg()
    s, _ = decide(running(c), TrainerExited(1), 1, c)
    s, _ = decide(s, Signalled("SIGTERM"), 2, c)
    s, acts = decide(s, ChildExited(Exit(1, "RuntimeError: boom")), 3, c)
    assert s.state == State.DONE and s.outcome == "stopped"
    ended = next(a for a in acts if type(a).__name__ == "AttemptEnded")
    assert ended.reason == "stopped" and ended.evidence == "crash"


def test_a_trainer_that_outlives_sigkill_is_given_up_on_not_waited_for_forever():
    from supervisor.core.events import Signalled
    c = cfg()
    s, _ = decide(running(c), Signalled("SIGTERM"), 1, c)        # SIGINT
    s, acts = decide(s, Tick(), 1 + 30, c)                       # stop.timeout_seconds: SIGKILL
    assert SignalGroup(signal.SIGKILL) in acts and s.kill_deadline == 31 + 30
    s2, acts = decide(s, Tick(), 60, c)
    assert acts == [] and s2.state == State.STOPPING
    s3, acts = decide(s, Tick(), 62, c)
    assert s3.state == State.FAILED and "did not exit" in s3.message
    gone, _ = decide(s, TrainerExited(-9), 40, c)                 # it did go: reaped as usual
    assert decide(gone, Tick(), 62, c)[0].state == State.STOPPING


def test_a_finished_fold_found_by_a_new_run_is_not_news():
    from supervisor.integrations import notices
    assert notices.notice_for(StateChanged("idle", "done", "target_reached", 0)) is None
    assert notices.notice_for(StateChanged("stopping", "done", "target_reached", 3))[0] == "target_reached"
    assert notices.notice_for(StateChanged("idle", "failed", "config_error", 0))[0] == "config_error"
