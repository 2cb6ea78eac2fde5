"""The supervisor's decisions, as a pure function: decide(sup, event, now, cfg) -> (sup', actions).

Nothing here does I/O, reads the clock or sleeps (the model is h11's _state.py). Adapters turn what
happened into Events; daemon.py queues them, calls `decide` once per event with a MONOTONIC `now` and
the config in force, and carries out the returned Actions (which may report follow-up events, queued
too). Every deadline (backoff, SIGKILL escalation, the wait for a checkpoint write, the wait for disk
space) is a monotonic timestamp kept in `Sup`, checked when a `Tick` arrives; state.json stores them as
wall-clock equivalents and `Sup.from_json` re-bases them onto the new process's monotonic clock.

`TABLE` maps every (State, Event type) pair to a rule or to IGNORED; `decide` raises on a pair that is
in neither, and a test enumerates every pair. `State.__doc__` (the lifecycle) is generated from it.

Stops the supervisor asks for (target, plateau, divergence, operator, heat, sensor or GPU loss) wait
for a safe point: after an epoch's last log line nnU-Net writes checkpoint_best/latest, and SIGINT in
the middle truncates the file (SIGINT saves nothing in nnU-Net). The next "Epoch N" or "Training
done." line is written after those saves. The wait is bounded ([stop].checkpoint_wait_seconds, or
[thermal].stop_wait_seconds for heat); a second SIGTERM forces it. A hang is stopped at once.

Restart budget: at most `max_restarts` restarts within `window_minutes`, else give up (exit 3); backoff
doubles per consecutive failure and resets once an attempt finishes an epoch. CUDA OOM steps the batch
size down (own budget, bounded by the step sequence), host OOM halves the augmentation workers; heat
and a full disk wait for their condition to clear; none of them counts against the crash budget.
"""

from . import transitions as t
from .events import (EVENTS, ActionFailed, Activity, BatchSizeSet, ChildExited, DiskSpace, EpochDone, EpochProfiled,
                     EpochStarted, NoCheckpoint, Readings, Reconfigured, Requeued, Start, StopRequested, Tick,
                     TrainingDone)
from .sup import ACTIVE, TERMINAL, State, Sup  # noqa: F401  (the policy's public names)

# ---- the transition table ---------------------------------------------------------------------------
S = State
TABLE: dict = {}
IGNORED = t.ignored


def _rule(states, events, fn) -> None:
    for st in states:
        for et in events:
            assert (st, et) not in TABLE, f"two rules for {st} x {et.__name__}"
            TABLE[(st, et)] = fn


_ALL = tuple(State)
_WAITING = (S.IDLE, S.BACKOFF, S.COOLING, S.NO_SPACE)
_rule(_ALL, (Start,), t.on_start)
_rule((S.RUNNING,), (Reconfigured,), t.on_reconfigured)
_rule((S.RUNNING, S.PAUSED, S.STOPPING), (EpochStarted,), t.on_epoch_started)
_rule((S.STOP_PENDING,), (EpochStarted, TrainingDone), t.on_safe_point)
_rule((S.RUNNING, S.PAUSED, S.STOPPING), (TrainingDone,), t.on_training_done)
_rule((S.RUNNING,), (EpochDone,), t.on_epoch_done)
_rule((S.PAUSED, S.STOP_PENDING, S.STOPPING), (EpochDone,), t.on_epoch_tracked)
_rule((S.RUNNING,), (Activity,), t.on_activity)
_rule((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.STOPPING), (EpochProfiled,), t.on_profiled)
_rule((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.COOLING), (Readings,), t.on_readings)
_rule((S.STOPPING, S.IDLE, S.BACKOFF, S.NO_SPACE, S.REQUEUING), (Readings,), t.on_temps_only)
_rule((S.NO_SPACE,), (DiskSpace,), t.on_disk_space)
_rule((S.RUNNING,), (NoCheckpoint,), t.on_no_checkpoint)
_rule((S.BACKOFF,), (BatchSizeSet,), t.on_batch_size_set)
_rule(tuple(set(_ALL) - TERMINAL), (ActionFailed,), t.on_action_failed)
_rule(tuple(ACTIVE), (ChildExited,), t.on_exit)
_rule((S.RUNNING, S.PAUSED), (StopRequested,), t.on_stop_requested)
_rule((S.STOP_PENDING,), (StopRequested,), t.on_stop_forced)
_rule((S.STOPPING,), (StopRequested,), t.on_stop_escalated)
_rule(_WAITING, (StopRequested,), t.on_stop_idle)
_rule((S.STOP_PENDING,), (Tick,), t.on_tick_safe_wait)
_rule((S.STOPPING,), (Tick,), t.on_tick_stopping)
_rule((S.BACKOFF,), (Tick,), t.on_tick_backoff)
_rule((S.NO_SPACE,), (Tick,), t.on_tick_no_space)
_rule((S.REQUEUING,), (Requeued,), t.on_requeued)
# Everything else is t.ignored on purpose: an event that cannot matter in that state (e.g. a log line of
# an attempt that already ended, a Tick with no deadline, anything after the final decision).
for _st in _ALL:
    for _et in EVENTS:
        TABLE.setdefault((_st, _et), IGNORED)


def decide(s: Sup, ev, now: float, cfg) -> tuple[Sup, list]:
    try:
        rule = TABLE[(s.state, type(ev))]
    except KeyError:
        raise TypeError(f"no rule for {s.state.value} x {type(ev).__name__}") from None
    return rule(s, ev, now, cfg)


def lifecycle() -> str:
    """The transition table as text (State.__doc__): every rule, one line per state and event."""
    lines = ["Where the supervised job stands. Rules (generated from policy.TABLE; other pairs are ignored):", ""]
    for st in State:
        for et in EVENTS:
            fn = TABLE[(st, et)]
            if fn is not IGNORED:
                lines.append(f"    {st.name:<12} {et.__name__:<14} {fn.__doc__.splitlines()[0]}")
    return "\n".join(lines)


State.__doc__ = lifecycle()
