"""The pure decision function: lifecycle, target stop at a safe point, backoff and restart intensity."""
import signal
from pathlib import Path

from supervisor.core.classify import Exit
from supervisor.config.loader import parse
from supervisor.core.training_log import EpochRecord
from supervisor.core.events import ChildExited, EpochDone, EpochStarted, Signalled, Start, Tick
from supervisor.core.actions import Finish, SignalGroup, InspectCheckpoints
from supervisor.core.exit_codes import ExitCode
from supervisor.core.policy import decide
from supervisor.core.record import State, Sup
from supervisor.core.criteria import backoff_delay

EXIT_CONFIG, EXIT_GAVE_UP = ExitCode.CONFIG, ExitCode.GAVE_UP


def cfg(**over):
    raw = {"training": {"dataset": "Dataset001_X"},
           "paths": {"preprocessed": "/p", "results": "/r", "state_dir": "/s"},
           "restart": {"backoff_seconds": 10, "backoff_max_seconds": 60, "max_restarts": 3,
                       "window_minutes": 10},
           "target": {"ema_dice": 0.7}, "stop": {"timeout_seconds": 30, "checkpoint_wait_seconds": 100}}
    for k, v in over.items():
        sec, key = k.split("__")
        raw.setdefault(sec, {})[key] = v
    return parse(raw, Path("/etc/x.toml"), env={})


def rec(epoch, ema, dice=(0.8, 0.8)):
    r = EpochRecord(epoch=epoch, dice=list(dice))
    r.ema = ema
    return r


def kinds(actions):
    return [type(a).__name__ for a in actions]


def running(c, now=0.0):
    s, acts = decide(Sup(), Start(), now, c)
    assert s.state == State.RUNNING and any(isinstance(a, InspectCheckpoints) for a in acts)
    return s


def test_target_waits_for_the_safe_point_then_sigint_then_done():
    c = cfg()
    s = running(c)
    s, acts = decide(s, EpochDone(rec(5, 0.69)), 1, c)
    assert s.state == State.RUNNING
    s, acts = decide(s, EpochDone(rec(6, 0.71)), 2, c)
    assert s.state == State.STOP_PENDING and not any(isinstance(a, SignalGroup) for a in acts)
    s, acts = decide(s, EpochStarted(7), 3, c)
    assert s.state == State.STOPPING
    assert [a.sig for a in acts if isinstance(a, SignalGroup)] == [signal.SIGINT]
    s, acts = decide(s, ChildExited(Exit(-signal.SIGINT, "KeyboardInterrupt")), 4, c)
    assert s.state == State.DONE and s.outcome == "target_reached" and Finish(0) in acts


def test_safe_point_wait_is_bounded():
    c = cfg()
    s = running(c)
    s, _ = decide(s, EpochDone(rec(6, 0.71)), 0, c)
    s, acts = decide(s, Tick(), 99, c)
    assert s.state == State.STOP_PENDING
    s, acts = decide(s, Tick(), 100, c)
    assert s.state == State.STOPPING and SignalGroup(signal.SIGINT) in acts


def test_min_class_dice_blocks_the_stop_while_a_class_is_unlearned():
    c = cfg(target__min_class_dice=0.5)
    s = running(c)
    s, _ = decide(s, EpochDone(rec(6, 0.75, dice=(0.9, 0.9, 0.0))), 0, c)
    assert s.state == State.RUNNING
    s, _ = decide(s, EpochDone(rec(7, 0.75, dice=(0.9, 0.9, float("nan")))), 0, c)
    assert s.state == State.RUNNING
    s, _ = decide(s, EpochDone(rec(8, 0.76, dice=(0.9, 0.9, 0.55))), 0, c)
    assert s.state == State.STOP_PENDING


def test_stop_escalates_to_sigkill_after_timeout():
    c = cfg()
    s = running(c)
    s, acts = decide(s, Signalled("SIGTERM"), 100, c)
    assert s.state == State.STOPPING and SignalGroup(signal.SIGINT) in acts
    s, acts = decide(s, Tick(), 129, c)
    assert acts == []
    s, acts = decide(s, Tick(), 130, c)
    assert SignalGroup(signal.SIGKILL) in acts and s.killed
    s, acts = decide(s, ChildExited(Exit(-signal.SIGKILL)), 131, c)
    assert s.outcome == "stopped" and Finish(0) in acts


def test_crash_backoff_doubles_and_is_a_deadline_not_a_sleep():
    c = cfg()
    s = running(c)
    s, acts = decide(s, ChildExited(Exit(1, "RuntimeError: boom")), 100, c)
    assert s.state == State.BACKOFF and s.restart_at == 110
    s, acts = decide(s, Tick(), 109.9, c)
    assert acts == [] and s.state == State.BACKOFF
    s, acts = decide(s, Tick(), 110, c)
    assert s.state == State.RUNNING and InspectCheckpoints() in acts and s.attempt == 2
    s, _ = decide(s, ChildExited(Exit(1)), 120, c)
    assert s.restart_at == 140  # 2 x 10 s: no epoch finished in between
    assert [backoff_delay(n, c) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_progress_resets_the_backoff():
    c = cfg()
    s = running(c)
    s, _ = decide(s, ChildExited(Exit(1)), 0, c)
    s, _ = decide(s, Tick(), 10, c)
    s, _ = decide(s, EpochDone(rec(0, 0.1)), 20, c)
    s, _ = decide(s, ChildExited(Exit(1)), 30, c)
    assert s.restart_at == 40 and s.consecutive_failures == 1


def test_restart_intensity_gives_up_then_forgets_old_restarts():
    c = cfg(restart__backoff_seconds=0, restart__backoff_max_seconds=0)
    s = running(c)
    t = 0.0
    for _ in range(3):
        s, _ = decide(s, ChildExited(Exit(1)), t, c)
        s, _ = decide(s, Tick(), t, c)
        assert s.state == State.RUNNING
        t += 60
    s, acts = decide(s, ChildExited(Exit(1)), t, c)
    assert s.state == State.FAILED and s.exit_code == EXIT_GAVE_UP and Finish(EXIT_GAVE_UP) in acts
    # the same 3 restarts spread over more than the 10-minute window are fine
    s = running(c)
    for i in range(6):
        s, _ = decide(s, ChildExited(Exit(1)), i * 400.0, c)
        s, _ = decide(s, Tick(), i * 400.0, c)
        assert s.state == State.RUNNING


def test_config_error_from_the_trainer_is_final():
    c = cfg()
    s = running(c)
    s, acts = decide(s, ChildExited(Exit(1, "RuntimeError: Could not find requested nnunet trainer X")), 0, c)
    assert s.state == State.FAILED and s.exit_code == EXIT_CONFIG


def test_start_when_already_done():
    c = cfg()
    s, acts = decide(Sup(), Start(final_checkpoint=True, validation_done=True), 0, c)
    assert s.outcome == "completed" and Finish(0) in acts
    s, acts = decide(Sup(), Start(last_epoch=rec(40, 0.72), best_checkpoint_ok=True), 0, c)
    assert s.outcome == "target_reached" and not any(isinstance(a, InspectCheckpoints) for a in acts)
    # a raised target means: keep training
    s, acts = decide(Sup(), Start(last_epoch=rec(40, 0.72)), 0, cfg(target__ema_dice=0.8))
    assert InspectCheckpoints() in acts


def test_stop_during_backoff_finishes_at_once():
    c = cfg()
    s = running(c)
    s, _ = decide(s, ChildExited(Exit(1)), 0, c)
    s, acts = decide(s, Signalled("SIGINT"), 1, c)
    assert s.state == State.DONE and s.outcome == "stopped" and Finish(0) in acts


def test_sup_roundtrips_through_json():
    c = cfg()
    s = running(c)
    s, _ = decide(s, ChildExited(Exit(1, "CUDA out of memory")), 5, c)
    # deadlines are monotonic; state.json holds wall-clock equivalents, re-based on load
    assert Sup.from_json(s.to_json(5, 1000.0), 5, 1000.0) == s
    moved = Sup.from_json(s.to_json(5, 1000.0), 50, 1000.0)  # a new process: another monotonic origin
    assert moved.restart_at == s.restart_at + 45
