"""The decision core: every State x Event pair has a rule or is explicitly ignored, and the defects found
around it (issue "One place for every decision") stay fixed."""
import dataclasses
import json
import signal
import sys
import types
from pathlib import Path

import pytest
import structlog

from conftest import wait_for
from supervisor.core.classify import Exit, Reason
from supervisor.core.actions import Finish, SetBatchSize, SignalGroup, StateChanged
from supervisor.core.events import (EVENTS, GpuFaults, ActionFailed, Activity, BatchSizeFitted, BatchSizeSet,
                                    CheckpointsInspected, ChildExited,
                                    DiskSpace, EpochDone, EpochProfiled, EpochStarted, Readings, Reconfigured,
                                    Remnants, Requeued, Signalled, SlurmJobState, Start, Tick, TrainerExited,
                                    TrainingDone)
from supervisor.core.exit_codes import ExitCode
from supervisor.core.diagnose import EpochProfile
from supervisor.core.training_log import EpochRecord
from supervisor.core import policy
from supervisor.core.policy import TABLE, Ignored, Rule, decide
from supervisor.core.record import State, Sup
from test_policy import cfg, rec

SAMPLES = {Start: Start(), Reconfigured: Reconfigured(), EpochStarted: EpochStarted(3),
           EpochDone: EpochDone(EpochRecord(epoch=3, dice=[0.5])), TrainingDone: TrainingDone(),
           Activity: Activity(0.0), Readings: Readings((("0", 60.0),)), DiskSpace: DiskSpace(1, 2, "/r"),
           CheckpointsInspected: CheckpointsInspected((("checkpoint_latest.pth", None),)),
           BatchSizeSet: BatchSizeSet(4, 3), ActionFailed: ActionFailed("x", "y"), TrainerExited: TrainerExited(1),
           Remnants: Remnants(), ChildExited: ChildExited(Exit(1, "RuntimeError")), Signalled: Signalled(),
           SlurmJobState: SlurmJobState("RUNNING"), Tick: Tick(), Requeued: Requeued("requeued"),
           EpochProfiled: EpochProfiled(EpochProfile(epoch=3, epoch_s=10.0)),
           GpuFaults: GpuFaults((("0", "uncorrectable ECC errors: 2 since the run began"),)),
           BatchSizeFitted: BatchSizeFitted(((2, 2**30, 1.0),), total_bytes=2**34, upper=8)}


def test_every_state_event_pair_is_a_rule_or_explicitly_ignored():
    assert set(SAMPLES) == set(EVENTS)
    pairs = [(st, et) for st in State for et in EVENTS]
    assert set(TABLE) == set(pairs)
    assert all(isinstance(TABLE[p], Rule) or (isinstance(TABLE[p], Ignored) and len(TABLE[p].why) > 10)
               for p in pairs)
    rules, ignored = policy.counts()
    print(f"transition table: {len(State)} states x {len(EVENTS)} events = {len(pairs)} pairs, "
          f"{rules} rules, {ignored} explicitly ignored")
    assert rules + ignored == len(pairs)


def _import_edited_policy(monkeypatch, old: str, new: str):
    """Import a scratch copy of core/policy.py with `old` replaced by `new`."""
    src = Path(policy.__file__).read_text()
    assert old in src
    scratch = types.ModuleType("scratch_policy")
    monkeypatch.setitem(sys.modules, "scratch_policy", scratch)
    exec(compile(src.replace(old, new), "scratch_policy.py", "exec"), scratch.__dict__)


def test_deleting_a_rule_stops_the_import_naming_the_pair(monkeypatch):
    """The table has no default: a deleted rule is a hole, never silently "ignored"."""
    line = "rule((S.RUNNING,), (EpochDone,), st.on_epoch_done, to=(S.STOP_PENDING, S.STOPPING))\n"
    with pytest.raises(AssertionError, match="no rule and not ignored: RUNNING x EpochDone$"):
        _import_edited_policy(monkeypatch, line, "")


def test_a_pair_declared_twice_stops_the_import(monkeypatch):
    mark = "# ---- ignored on purpose"
    with pytest.raises(AssertionError, match="RUNNING x EpochDone is declared twice"):
        _import_edited_policy(monkeypatch, mark, "ignore((S.RUNNING,), (EpochDone,), 'a second one')\n" + mark)


@pytest.mark.parametrize("st", list(State))
def test_ignored_pairs_change_nothing_and_rules_move_only_where_declared(st):
    c = cfg()
    s = Sup(state=st, attempt=1, last_progress=0.0, batch_size=4, restart_at=5.0, safe_deadline=5.0,
            stop_deadline=5.0, disk_deadline=50.0, stop_reason=Reason.TARGET_REACHED)
    for et, ev in SAMPLES.items():
        s2, acts = decide(s, ev, 10.0, c)  # decide checks every move against the rule's declaration
        entry = TABLE[(st, et)]
        if isinstance(entry, Ignored):
            assert (s2, acts) == (s, []), f"{st.name} x {et.__name__}"
        elif s2.state != st:
            assert s2.state in entry.targets
            assert [(a.old, a.new) for a in acts if isinstance(a, StateChanged)] == [(st.value, s2.state.value)]


def test_a_rule_that_moves_where_it_did_not_declare_is_refused(monkeypatch):
    def rogue(s, ev, now, cfg):
        """rogue"""
        return dataclasses.replace(s, state=State.DONE), []
    monkeypatch.setitem(TABLE, (State.RUNNING, Tick), Rule(rogue, frozenset()))
    with pytest.raises(policy.IllegalMove, match="without transition"):
        decide(Sup(state=State.RUNNING), Tick(), 0, cfg())

    def sneaky(s, ev, now, cfg):
        """sneaky"""
        from supervisor.core.transition import transition
        s, ch = transition(s, State.DONE, "x")
        return s, [ch]
    monkeypatch.setitem(TABLE, (State.RUNNING, Tick), Rule(sneaky, frozenset({State.FAILED})))
    with pytest.raises(policy.IllegalMove, match="declared"):
        decide(Sup(state=State.RUNNING), Tick(), 0, cfg())


def test_every_move_emits_one_state_changed():
    c = cfg()
    s, acts = decide(Sup(), Start(), 0, c)
    assert [a for a in acts if isinstance(a, StateChanged)] == [StateChanged("idle", "running", "start", 1)]
    s, acts = decide(s, EpochDone(rec(6, 0.71)), 1, c)
    assert [(a.old, a.new, a.cause) for a in acts if isinstance(a, StateChanged)] == [
        ("running", "stop_pending", "target_reached")]


def test_every_action_has_an_executor():
    from supervisor.core import actions
    from supervisor.daemon.executor import HANDLERS
    declared = {v for v in vars(actions).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
                and v.__module__ == actions.__name__}
    assert declared == set(HANDLERS)


def test_an_unknown_event_type_is_an_error_not_silence():
    with pytest.raises(TypeError, match="no rule"):
        decide(Sup(), object(), 0, cfg())


def test_lifecycle_doc_is_generated_from_the_table():
    doc = State.__doc__
    for (st, et), entry in TABLE.items():
        if isinstance(entry, Rule):
            assert f"{st.name:<12} {et.__name__:<20} {entry.summary}" in doc


def target_pending(c):
    s, _ = decide(Sup(), Start(), 0, c)
    s, acts = decide(s, EpochDone(rec(6, 0.71)), 1, c)
    assert s.state == State.STOP_PENDING and not [a for a in acts if isinstance(a, SignalGroup)]
    return s


def test_death_while_waiting_for_the_safe_point_is_not_target_reached():
    """Regression: ENOSPC writing checkpoint_best.pth after the target epoch was recorded target_reached, exit 0."""
    c = cfg()
    s = target_pending(c)
    s, acts = decide(s, ChildExited(Exit(1, "OSError: [Errno 28] No space left on device")), 2, c)
    assert s.outcome != "target_reached" and Finish(ExitCode.OK) not in acts
    assert s.last_reason == Reason.DISK_FULL and s.state == State.NO_SPACE


def test_target_reached_requires_a_complete_checkpoint_best():
    c = cfg()
    s = target_pending(c)
    s, _ = decide(s, EpochStarted(7), 2, c)
    s, acts = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt"), best_checkpoint_ok=False), 3, c)
    assert s.outcome is None and s.state == State.BACKOFF  # resumed, never called done
    s = target_pending(c)
    s, _ = decide(s, EpochStarted(7), 2, c)
    s, acts = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt")), 3, c)
    assert s.outcome == "target_reached" and Finish(ExitCode.OK) in acts


def test_sigterm_while_a_checkpoint_is_written_waits_for_the_safe_point_and_a_second_forces():
    """Regression: SIGTERM right after the target epoch sent SIGINT at once and truncated checkpoint_best."""
    c = cfg()
    s = target_pending(c)
    s, acts = decide(s, Signalled("SIGTERM"), 2, c)  # systemctl stop while the target stop waits
    assert s.state == State.STOP_PENDING and not any(isinstance(a, SignalGroup) for a in acts)
    assert s.stop_reason == Reason.TARGET_REACHED        # ... the outcome stays target_reached
    s2, acts = decide(s, Signalled("SIGTERM"), 3, c)  # a second one forces it
    assert s2.state == State.STOPPING and SignalGroup(signal.SIGINT) in acts
    s3, acts = decide(s2, Signalled("SIGTERM"), 4, c)  # a third: SIGKILL
    assert SignalGroup(signal.SIGKILL) in acts
    s, _ = decide(s, EpochStarted(7), 3, c)              # or the safe point comes first: SIGINT then
    s, acts = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt")), 4, c)
    assert s.outcome == "target_reached"
    s, _ = decide(Sup(), Start(), 0, c)
    s, _ = decide(s, EpochDone(rec(3, 0.2)), 1, c)       # saves follow this line
    s, acts = decide(s, Signalled("SIGTERM"), 2, c)
    assert s.state == State.STOP_PENDING and s.stop_reason == Reason.STOPPED and not any(
        isinstance(a, SignalGroup) for a in acts)
    s, acts = decide(s, EpochStarted(4), 3, c)
    assert s.state == State.STOPPING and SignalGroup(signal.SIGINT) in acts
    s, acts = decide(s, ChildExited(Exit(-2)), 4, c)
    assert s.outcome == "stopped"
    s, _ = decide(Sup(), Start(), 0, c)                  # mid-epoch (nothing is written): at once
    s, _ = decide(s, EpochStarted(0), 1, c)
    s, acts = decide(s, Signalled("SIGTERM"), 2, c)
    assert s.state == State.STOPPING


def test_a_failed_plans_write_is_decided_after_the_fact_not_logged_as_done():
    """Regression: a read-only plans file logged finished exit 2 and THEN batch_size_reduced."""
    c = cfg()
    s, _ = decide(Sup(), Start(batch_size=4), 0, c)
    s, acts = decide(s, ChildExited(Exit(1, "torch.OutOfMemoryError: CUDA out of memory")), 1, c)
    assert acts[-1] == SetBatchSize(4, 3) and s.batch_size == 4  # nothing recorded before it succeeded
    assert not any(getattr(a, "event", "") == "batch_size_reduced" for a in acts)
    s2, acts = decide(s, ActionFailed("SetBatchSize", "read-only"), 2, c)
    assert s2.state == State.FAILED and s2.exit_code == ExitCode.CONFIG and s2.batch_size == 4
    s3, acts = decide(s, BatchSizeSet(4, 3), 2, c)
    assert s3.batch_size == 3 and [a.event for a in acts][0] == "batch_size_reduced"


def test_an_exit_seen_before_our_sigint_is_judged_on_its_own_evidence():
    """Regression (review): the trainer died of ENOSPC while the target stop waited; the checkpoint wait ran
    out during the reaping and the exit was then labelled target_reached."""
    c = cfg()
    s = target_pending(c)
    s, _ = decide(s, TrainerExited(1), 999, c)           # it died while we waited for the safe point
    s, _ = decide(s, Tick(), 1000, c)                    # wait over: SIGINT (but the trainer was already gone)
    assert s.state == State.STOPPING
    s, acts = decide(s, ChildExited(Exit(1, "OSError: [Errno 28] No space left on device")), 1001, c)
    assert s.last_reason == Reason.DISK_FULL and s.outcome is None


def test_a_restart_with_the_target_met_needs_a_complete_checkpoint_best():
    """Regression (review): a restarted supervisor called the run target_reached with a truncated best."""
    c = cfg()
    s, acts = decide(Sup(state=State.NO_SPACE), Start(last_epoch=rec(5, 0.75), best_checkpoint_ok=False), 0, c)
    assert s.outcome is None
    s, acts = decide(Sup(), Start(last_epoch=rec(5, 0.75), best_checkpoint_ok=True), 0, c)
    assert s.outcome == "target_reached"


def test_daemon_queues_follow_up_events_in_order(job, monkeypatch):
    """With a plans write that fails, the log shows the failure and nothing claims the size changed."""
    from supervisor.integrations import plans
    from supervisor.config.loader import load
    from supervisor.daemon.loop import Daemon

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(plans, "set_batch_size", refuse)
    d = Daemon(load(job.config()))
    d.prepare()
    d.sup = Sup(state=State.RUNNING, attempt=1, batch_size=2, last_progress=0.0)
    d.attempts = [{"n": 1}]
    with structlog.testing.capture_logs() as logs:
        d.post(ChildExited(Exit(1, "torch.OutOfMemoryError: CUDA out of memory")))
        d.pump()
    names = [e["event"] for e in logs]
    assert "batch_size_reduced" not in names and "restart_scheduled" not in names
    assert names.index("attempt_ended") < names.index("finished")
    assert d.sup.batch_size == 2 and d.finish_code == ExitCode.CONFIG
    assert json.loads(job.plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 2
    d.lock.release()


def test_deadlines_use_the_monotonic_clock(job):
    """Regression: a wall-clock step of -1 h during backoff delayed the restart by an hour."""
    from supervisor.config.loader import load
    from supervisor.daemon.loop import Daemon

    clock = {"mono": 1000.0, "wall": 5_000_000.0}
    d = Daemon(load(job.config(restart={"backoff_seconds": 30, "backoff_max_seconds": 60})),
               mono=lambda: clock["mono"], wall=lambda: clock["wall"])
    d.prepare()
    d.sup = Sup(state=State.BACKOFF, attempt=1, restart_at=1030.0)
    clock["wall"] -= 3600  # the wall clock steps back an hour
    clock["mono"] = 1031.0
    d.post(Tick())
    d.pump()
    try:
        assert d.sup.state == State.RUNNING and d.child is not None
    finally:
        d.child.popen.kill()
        d.child.popen.wait()
        d.lock.release()


@pytest.mark.parametrize("bad", [{"sup": {"state": "exploded"}}, {"sup": {}, "attempts": "oops"},
                                 {"sup": {"batch_size": "four"}}, {"sup": {"restart_times": [1, "x"]}},
                                 # records the rules compute with: a trial's times, a fit's headroom
                                 {"sup": {"tuning": {"phase": "trial", "from": 1, "to": 2, "before_s": "x"}}},
                                 {"sup": {"fit": {"phase": "probing", "from": 2, "headroom": "lots"}}}])
def test_a_state_json_with_impossible_fields_is_moved_aside(job, bad):
    """Regression: state: "exploded" or attempts: "oops" made every start exit 1 with a traceback."""
    cfg_path = job.config(env={"FAKE_EPOCHS": "2"})
    job.state.mkdir()
    from supervisor.config import job as jobmod
    from supervisor.config.loader import load
    identity = jobmod.job_identity(load(cfg_path))
    (job.state / "state.json").write_text(json.dumps({"version": 1, "job": identity, **bad}))
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    assert "state_moved_aside" in out and "Traceback" not in out
    assert list(job.state.glob("state.json.corrupt-*"))


def test_a_directory_named_state_json_is_moved_aside(job):
    cfg_path = job.config(env={"FAKE_EPOCHS": "2"})
    (job.state / "state.json").mkdir(parents=True)
    rc, out = job.run(cfg_path)
    assert rc == 0 and "Traceback" not in out, out
    assert list(job.state.glob("state.json.corrupt-*"))


def test_stock_style_checkpoint_write_survives_sigterm_at_the_worst_moment(job):
    """Regression: a stop in the middle of a stock torch.save truncated checkpoint_best.pth."""
    from supervisor.integrations.checkpoints import verify
    cfg_path = job.config(env={"FAKE_EPOCHS": "50", "FAKE_EPOCH_S": "0.3", "FAKE_SAVE_S": "2"},
                          stop={"timeout_seconds": 20, "checkpoint_wait_seconds": 30})
    p = job.start(cfg_path)
    try:
        # the supervisor logs an epoch as soon as its last line is read: the 2 s of saves start then
        wait_for(lambda: "epoch epoch=1 " in p.log_path.read_text(), timeout=60, what="epoch 1")
        p.send_signal(signal.SIGTERM)
    finally:
        out, _ = p.communicate(timeout=90)
    assert p.returncode == 0, out
    assert "stop_waits_for_checkpoint" in out, out[-3000:]
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        f = job.fold / name
        assert not f.exists() or verify(f) is None, f"{name} truncated"


def test_slurm_preemption_stops_at_the_safe_point_requeues_and_is_bounded():
    from supervisor.core.actions import QuerySlurmJob, Requeue
    c = cfg(slurm__max_requeues=2)
    s, _ = decide(Sup(), Start(slurm_restarts=1), 0, c)
    s, _ = decide(s, EpochDone(rec(3, 0.2)), 1, c)
    s, acts = decide(s, Signalled("SIGUSR1", in_slurm=True), 2, c)
    assert s.state == State.STOP_PENDING and s.stop_reason == Reason.PREEMPTED
    s, acts = decide(s, EpochStarted(4), 3, c)
    s, acts = decide(s, ChildExited(Exit(-2, "KeyboardInterrupt")), 4, c)
    assert s.state == State.REQUEUING and QuerySlurmJob() in acts and s.last_reason == Reason.PREEMPTED
    assert s.restart_times == ()  # no restart budget used
    s, acts = decide(s, SlurmJobState("RUNNING"), 5, c)    # SLURM asked us to act: requeue
    assert s.state == State.REQUEUING and acts == [Requeue()]
    done, acts = decide(s, Requeued("requeued", "scontrol requeue 7"), 5, c)
    assert done.outcome == "preempted" and Finish(ExitCode.OK) in acts
    failed, acts = decide(s, Requeued("failed", "denied"), 5, c)
    assert failed.exit_code == ExitCode.GAVE_UP and "denied" in failed.message
    for ending in ("COMPLETING", "CANCELLED"):                   # scancel is never undone
        cancelled, acts = decide(s, SlurmJobState(ending), 5, c)
        assert cancelled.outcome == "stopped" and cancelled.exit_code == ExitCode.OK and Requeue() not in acts
        assert ending in cancelled.message
    s, _ = decide(Sup(), Start(slurm_restarts=0), 0, c)        # SLURM's signal during a backoff: requeue
    s, _ = decide(s, ChildExited(Exit(1, "RuntimeError")), 1, c)
    assert s.state == State.BACKOFF
    s, acts = decide(s, Signalled("SIGUSR1", in_slurm=True), 2, c)
    assert s.state == State.REQUEUING and QuerySlurmJob() in acts
    s, _ = decide(Sup(), Start(slurm_restarts=2), 0, c)        # the bound
    s, _ = decide(s, Signalled("SIGUSR1", in_slurm=True), 1, c)
    s, acts = decide(s, ChildExited(Exit(-2)), 2, c)
    assert s.outcome == "preempted" and not any(isinstance(a, (Requeue, QuerySlurmJob)) for a in acts)


def test_a_signal_means_what_the_policy_says_inside_and_outside_slurm():
    """Moved from the daemon into the core: SIGUSR1 outside SLURM is ignored, SIGHUP reloads, SIGTERM stops
    (requeues inside SLURM)."""
    from supervisor.core.actions import Log, Reload
    c = cfg()
    run, _ = decide(Sup(), Start(), 0, c)
    s, acts = decide(run, Signalled("SIGUSR1"), 1, c)
    assert s == run and [a.event for a in acts if isinstance(a, Log)] == ["signal_ignored"]
    s, acts = decide(run, Signalled("SIGHUP"), 1, c)
    assert s == run and acts == [Reload()]
    s, _ = decide(run, Signalled("SIGTERM"), 1, c)
    assert s.stop_reason == Reason.STOPPED
    s, _ = decide(run, Signalled("SIGTERM", in_slurm=True), 1, c)
    assert s.stop_reason == Reason.PREEMPTED
    s, _ = decide(run, Signalled("SIGINT", in_slurm=True), 1, c)
    assert s.stop_reason == Reason.STOPPED


def test_a_full_disk_waits_for_space_without_spending_the_restart_budget(job):
    cfg_path = job.config(env={"FAKE_EPOCHS": "4", "FAKE_FAULT": "1:enospc"},
                          restart={"max_restarts": 0})
    rc, out = job.run(cfg_path, timeout=120)
    # the disk is not really full here: the first measurement finds room and training resumes with --c
    assert rc == 0, out
    assert "reason=disk_full" in out and "disk_space_ok" in out, out[-3000:]
    assert job.state_json()["sup"]["outcome"] == "completed"


# ---- hostile machine: leftovers, other trainers, the completed check ----------------------------------
def test_a_worker_whose_trainer_died_is_stopped_by_the_next_supervisor(job):
    """Regression: after SIGKILL of the supervisor, a worker whose leader had died kept running beside the
    new trainer. Every process of an attempt carries the attempt marker; the next start stops them all."""
    import psutil
    cfg_path = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"})
    p = job.start(cfg_path)
    try:
        job.wait_epochs(1)
        att = job.state_json()["attempts"][-1]
        leader = psutil.Process(att["pid"])
        workers = [c.pid for c in leader.children(recursive=True)]
        assert workers, "the fake trainer has an augmentation worker"
        p.kill()                      # the supervisor dies without a word
        p.communicate()
        leader.kill()                 # ... and so does the trainer; its worker is left alone
        leader.wait(10)
        assert any(psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE for w in workers)
        rc, out = job.run(job.config(env={"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.1"}), timeout=120)
        assert rc == 0, out
        assert "stopping_leftover_trainer" in out
        for w in workers:
            assert not psutil.pid_exists(w) or psutil.Process(w).status() == psutil.STATUS_ZOMBIE
    finally:
        if p.poll() is None:
            p.kill()


def test_the_attempt_is_recorded_before_the_trainer_exists(job):
    """Regression: SIGKILL of the supervisor between spawn and the state save left an unknown trainer."""
    from supervisor.integrations import proc
    cfg_path = job.config(env={"FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"})
    p = job.start(cfg_path)
    try:
        wait_for(lambda: (job.state / "state.json").exists() and job.state_json()["attempts"], timeout=30,
                 what="an attempt record")
        att = job.state_json()["attempts"][0]
        assert att["argv"] and att["log"]           # written before the fork, pid or not
        wait_for(lambda: proc.marked_processes(job.state), timeout=30, what="the marked trainer")
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)


def test_another_trainer_on_the_fold_is_refused_then_taken_over(job):
    """Regression: a hand-started `nnUNetv2_train ... --c` on the same fold was not noticed."""
    import os
    import subprocess
    import sys
    from conftest import DATASET, FAKE, REPO
    link = job.root / "nnUNetv2_train"      # a program named like nnU-Net's, running the fake trainer
    link.write_text(f"#!{sys.executable}\nimport runpy, sys; sys.argv[0] = {str(FAKE)!r}; "
                    f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n")
    link.chmod(0o755)
    env = {**os.environ, "nnUNet_preprocessed": str(job.pre), "nnUNet_results": str(job.results),
           "FAKE_EPOCHS": "500", "FAKE_EPOCH_S": "0.2"}
    other = subprocess.Popen([str(link), DATASET, "3d_fullres", "0", "-device", "cpu"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: list(job.fold.glob("checkpoint_latest.pth")), timeout=60, what="the other trainer")
        cfg_path = job.config(env={"FAKE_EPOCHS": "6", "FAKE_EPOCH_S": "0.1"})
        chk = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(cfg_path)],
                             capture_output=True, text=True, timeout=300)
        assert f"pid {other.pid}" in chk.stdout and "another trainer" in chk.stdout
        rc, out = job.run(cfg_path, timeout=60)
        assert rc == ExitCode.CONFIG and f"pid {other.pid}" in out and "--take-over" in out
        assert other.poll() is None           # refused: nothing was done to it
    except BaseException:
        other.kill()
        raise
    # --take-over: stop it at its next safe point, continue with --c
    p = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg_path), "--take-over"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        out, _ = p.communicate(timeout=180)
    finally:
        if other.poll() is None:
            other.kill()
        other.wait()
    assert p.returncode == 0, out[-3000:]
    assert "take_over_waiting_for_safe_point" in out, out[-3000:]
    assert "taking over: the other trainer's checkpoint writes finished" in out, out[-3000:]  # at its safe point
    assert "take_over_done" in out and "continuing with --c" in out
    first, ours = job.state_json()["attempts"][:2]
    assert first["adopted"] == [other.pid]           # the other trainer was the attempt the policy stopped
    assert ours["resume_from"] is not None and "--c" in ours["argv"]  # continued with --c


def test_completed_needs_the_validation_summary_too(job):
    """Regression: SIGKILL after "Training done." and before the validation finished was called completed."""
    cfg_path = job.config(env={"FAKE_EPOCHS": "2", "FAKE_EPOCH_S": "0.1"})
    rc, out = job.run(cfg_path)
    assert rc == 0 and (job.fold / "validation" / "summary.json").is_file()
    (job.fold / "validation" / "summary.json").unlink()   # as if killed during the final validation
    rc, out = job.run(cfg_path)
    assert rc == 0, out
    assert "final_validation_missing" in out and "--val" in out
    assert (job.fold / "validation" / "summary.json").is_file()
    assert job.state_json()["sup"]["outcome"] == "completed"
    rc, out = job.run(cfg_path)                            # now it really is complete
    assert rc == 0 and "training already completed" in out


def test_no_space_waits_measures_and_gives_up_with_the_amount_needed():
    from supervisor.core.actions import InspectCheckpoints, MeasureDisk
    from supervisor.core.criteria import space_needed
    c = cfg(restart__disk_full_wait_minutes=10)
    need = space_needed(500, 2)                                  # the one formula: check and docs use it too
    s, _ = decide(Sup(), Start(), 0, c)
    s, _ = decide(s, ChildExited(Exit(1, "OSError: [Errno 28] No space left on device")), 1, c)
    assert s.state == State.NO_SPACE and s.restart_times == ()   # no restart budget used
    s, acts = decide(s, Tick(), 2, c)
    assert MeasureDisk() in acts
    s, acts = decide(s, DiskSpace(free_bytes=10, largest_checkpoint=500, folder="/r", existing=2), 2, c)
    assert s.state == State.NO_SPACE and acts == [] and s.disk_needed == need   # still full: keep waiting
    s2, acts = decide(s, Tick(), 10, c)
    assert acts == []                                            # measured every 30 s, not every tick
    s3, acts = decide(s, DiskSpace(free_bytes=need, largest_checkpoint=500, folder="/r", existing=2), 40, c)
    assert s3.state == State.RUNNING and isinstance(acts[-1], InspectCheckpoints)
    s4, acts = decide(s, Tick(), 1 + 600, c)
    assert s4.exit_code == ExitCode.GAVE_UP and f"{need} bytes are needed" in s4.message


def test_state_json_is_written_for_durable_changes_only(job):
    """A progress line alone (EpochStarted: last_progress, writing) is not worth a write; an epoch is."""
    from supervisor.config.loader import load
    from supervisor.daemon.loop import Daemon
    d = Daemon(load(job.config()))
    d.prepare()
    try:
        d.sup = Sup(state=State.RUNNING, attempt=1, last_progress=0.0)
        saves = []
        d.save = lambda: saves.append(d.sup)
        d.post(EpochStarted(4))
        d.pump()
        assert saves == [] and d.sup.last_progress != 0.0
        d.post(EpochDone(rec(4, 0.2)))
        d.pump()
        assert len(saves) == 1 and saves[0].epochs_this_attempt == 1
    finally:
        d.lock.release()


def test_an_adopted_trainer_in_several_groups_is_signalled_in_each():
    """Review finding: only the first adopted trainer's group got the SIGINT; the second kept running and the
    take-over waited for it forever."""
    import subprocess
    from supervisor.daemon.attempt import Attempt
    procs = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        a = Attempt(1, procs[0].pid, 0.0, adopted=tuple(p.pid for p in procs))
        assert not a.poll()
        assert a.signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(10) == -signal.SIGTERM
        wait_for(a.poll, timeout=10, what="the adopted attempt seen as ended")
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_checkpoint_that_cannot_be_moved_aside_starts_no_trainer(job, monkeypatch):
    """Review finding: the move failed, its ActionFailed was queued, and the Spawn beside it ran anyway."""
    from supervisor.config.loader import load
    from supervisor.core.actions import Spawn
    from supervisor.daemon import executor
    from supervisor.daemon.loop import Daemon

    def refuse(path, tag):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(executor, "move_aside", refuse)
    d = Daemon(load(job.config()))
    d.prepare()
    try:
        d.sup = Sup(state=State.RUNNING, attempt=1, last_progress=0.0)
        d.execute(Spawn("checkpoint_best.pth", resume=True, move_aside=(("checkpoint_latest.pth", "truncated"),)))
        assert d.child is None and d.attempts == []
        assert [type(e).__name__ for e in d.events] == ["ActionFailed"] and "--c would load it" in d.events[0].message
        d.pump()
        assert d.sup.state == State.FAILED and d.finish_code == ExitCode.CONFIG
    finally:
        d.lock.release()


@pytest.mark.parametrize("reason,state", [(Reason.THERMAL_STOP, "cooling"), (Reason.HANG, "backoff")])
def test_no_saved_state_ends_an_attempt_without_its_reason(job, monkeypatch, reason, state):
    """Every state.json the daemon writes that shows the run past an attempt (cooling, backoff, ...) also
    shows why that attempt ended: AttemptEnded is carried out before the move, and the file is written once
    the pump is empty (a reader never sees "cooling" beside an attempt whose reason is unset)."""
    from supervisor.config.loader import load
    from supervisor.daemon.loop import Daemon
    from supervisor.integrations.store import StateStore

    saved = []
    real = StateStore.save
    monkeypatch.setattr(StateStore, "save", lambda self, data: (saved.append(json.loads(json.dumps(data))),
                                                                 real(self, data)))
    d = Daemon(load(job.config(thermal={"enabled": False})))
    d.prepare()
    d.sup = Sup(state=State.STOPPING, attempt=1, stop_reason=reason, last_progress=0.0, stop_deadline=1e9)
    d.attempts = [{"n": 1, "reason": None, "ended_at": None}]
    d.post(ChildExited(Exit(-signal.SIGINT, "KeyboardInterrupt")))
    d.pump()
    d.lock.release()
    assert saved and saved[-1]["sup"]["state"] == state
    for data in saved:
        if data["sup"]["state"] not in ("running", "stop_pending", "stopping", "paused"):
            assert data["attempts"][-1]["reason"] == reason.value, data["attempts"]
