"""The supervisor's decisions, as a pure function: decide(sup, event, now, cfg) -> (sup', actions).

Nothing here does I/O, reads the clock or sleeps (the model is h11's _state.py). Adapters turn what
happened into events; daemon/loop.py queues them, calls `decide` once per event with a MONOTONIC `now`
and the config in force, and daemon/executor.py carries out the returned actions (which may report
follow-up events, queued too: the dispatcher is never re-entered). Every deadline (backoff, SIGKILL
escalation, the wait for a checkpoint write, for disk space, for remnants and GPU memory) is a monotonic
timestamp kept in `Sup`, checked when a `Tick` or a measurement arrives.

The table: every (State, event type) pair is either a `Rule` (a function of rules_attempt / rules_stop /
rules_watch, and the states it may move to) or `Ignored` with the reason it cannot matter in that state.
Both are declared explicitly below; a pair declared twice, or not at all, stops the import with the
pairs named (so deleting a rule breaks every test instead of turning it into silence), and `decide`
raises on an event type it does not know. After a rule runs, `decide` checks its move: a state change
must come with exactly one StateChanged (made by transition.transition) and go to a declared state.
`State.__doc__` (the lifecycle) and docs/how-it-decides.md are generated from the table.

Restart budget: at most `max_restarts` restarts within `window_minutes`, else give up (exit 3); backoff
doubles per consecutive failure and resets once an attempt finishes an epoch. CUDA OOM steps the batch
size down (own budget, bounded by the step sequence), host OOM halves the augmentation workers; heat
and a full disk wait for their condition to clear; none of them counts against the crash budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from supervisor.core import rules_attempt as a
from supervisor.core import rules_fit as fit
from supervisor.core import rules_remedy as rm
from supervisor.core import rules_stop as st
from supervisor.core import rules_watch as w
from supervisor.core.actions import StateChanged
from supervisor.core.events import (EVENTS, ActionFailed, Activity, BatchSizeFitted, BatchSizeSet, CheckpointsInspected,
                                    ChildExited,
                                    GpuFaults,
                                    DiskSpace, EpochDone, EpochProfiled, EpochStarted, Readings, Reconfigured,
                                    Remnants, Requeued, Signalled, SlurmJobState, Start, Tick, TrainerExited,
                                    TrainingDone)
from supervisor.core.record import ACTIVE, TERMINAL, State, Sup


@dataclass(frozen=True)
class Rule:
    fn: Callable
    targets: frozenset  # the states it may move to (staying where it is needs no declaration)

    @property
    def summary(self) -> str:
        return self.fn.__doc__.strip().splitlines()[0]


@dataclass(frozen=True)
class Ignored:
    why: str


class IllegalMove(AssertionError):
    """A rule moved the job somewhere it did not declare, or without its StateChanged: a bug."""


S = State
TABLE: dict = {}


def _put(states, events, entry) -> None:
    for state in states:
        for et in events:
            if (state, et) in TABLE:
                raise AssertionError(f"{state.name} x {et.__name__} is declared twice")
            TABLE[(state, et)] = entry


def rule(states, events, fn, to=()) -> None:
    _put(states, events, Rule(fn, frozenset(to)))


def ignore(states, events, why: str) -> None:
    _put(states, events, Ignored(why))


ALL = tuple(State)
LIVE = tuple(x for x in State if x not in TERMINAL)
WAITING = (S.IDLE, S.BACKOFF, S.COOLING, S.NO_SPACE)
NO_TRAINER = (*WAITING, S.REQUEUING)
ENDINGS = (S.DONE, S.FAILED, S.BACKOFF, S.COOLING, S.NO_SPACE, S.REQUEUING, S.RUNNING)

# ---- rules -----------------------------------------------------------------------------------------------
rule(ALL, (Start,), a.on_start, to=(S.RUNNING, S.STOP_PENDING, S.DONE, S.FAILED, S.IDLE))  # IDLE: the fit
rule((S.RUNNING,), (CheckpointsInspected,), a.on_checkpoints, to=(S.FAILED,))
rule((S.PAUSED,), (CheckpointsInspected,), a.on_checkpoints_paused, to=(S.FAILED,))
rule((S.STOPPING,), (CheckpointsInspected,), a.on_checkpoints_stopping, to=ENDINGS)
rule(ACTIVE, (TrainerExited,), a.on_trainer_exited)
rule(ACTIVE, (Remnants,), a.on_remnants)
rule(ACTIVE, (ChildExited,), a.on_exit, to=ENDINGS)
rule((S.BACKOFF,), (BatchSizeSet,), a.on_batch_size_set)
rule(LIVE, (ActionFailed,), a.on_action_failed, to=(S.FAILED,))
rule((S.BACKOFF,), (Tick,), a.on_tick_backoff, to=(S.RUNNING,))

rule((S.RUNNING,), (Reconfigured,), st.on_reconfigured, to=(S.STOP_PENDING, S.STOPPING))
rule((S.RUNNING,), (EpochDone,), st.on_epoch_done, to=(S.STOP_PENDING, S.STOPPING))
rule((S.STOP_PENDING,), (EpochStarted, TrainingDone), st.on_safe_point, to=(S.STOPPING,))
rule((S.STOP_PENDING,), (Tick,), st.on_tick_safe_wait, to=(S.STOPPING,))
rule((S.STOPPING,), (Tick,), st.on_tick_stopping, to=(S.FAILED,))
rule((S.RUNNING, S.PAUSED), (Signalled,), st.on_signal_running, to=(S.STOP_PENDING, S.STOPPING))
rule((S.STOP_PENDING,), (Signalled,), st.on_signal_pending, to=(S.STOPPING,))
rule((S.STOPPING,), (Signalled,), st.on_signal_stopping)
rule((S.BACKOFF, S.COOLING, S.NO_SPACE), (Signalled,), st.on_signal_waiting, to=(S.DONE, S.REQUEUING))
rule((S.IDLE,), (Signalled,), fit.cancels_fit(st.on_signal_waiting), to=(S.DONE, S.REQUEUING))
rule((S.REQUEUING,), (Signalled,), st.on_signal_requeuing)
rule((S.REQUEUING,), (SlurmJobState,), st.on_slurm_job_state, to=(S.DONE,))
rule((S.REQUEUING,), (Requeued,), st.on_requeued, to=(S.DONE, S.FAILED))

rule((S.RUNNING, S.PAUSED, S.STOPPING), (EpochStarted,), w.on_epoch_started)
rule((S.RUNNING, S.PAUSED, S.STOPPING), (TrainingDone,), w.on_training_done)
rule((S.PAUSED, S.STOP_PENDING, S.STOPPING), (EpochDone,), w.on_epoch_tracked)
rule((S.RUNNING,), (Activity,), w.on_activity, to=(S.STOPPING,))
rule(ACTIVE, (EpochProfiled,), w.on_profiled, to=(S.STOP_PENDING, S.STOPPING))
rule((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.COOLING), (Readings,), w.on_readings,
     to=(S.PAUSED, S.RUNNING, S.STOP_PENDING, S.STOPPING, S.FAILED))
rule((S.STOPPING, S.IDLE, S.BACKOFF, S.NO_SPACE, S.REQUEUING), (Readings,), w.on_temps_only)
rule([x for x in LIVE if x != S.IDLE], (GpuFaults,), rm.on_gpu_faults, to=(S.STOP_PENDING, S.STOPPING, S.FAILED))
rule((S.IDLE,), (GpuFaults,), fit.cancels_fit(rm.on_gpu_faults), to=(S.STOP_PENDING, S.STOPPING, S.FAILED))
rule((S.NO_SPACE,), (DiskSpace,), w.on_disk_space, to=(S.RUNNING,))
rule((S.NO_SPACE,), (Tick,), w.on_tick_no_space, to=(S.FAILED,))

rule((S.IDLE,), (BatchSizeFitted,), fit.on_fitted, to=(S.RUNNING,))
rule((S.IDLE,), (BatchSizeSet,), fit.on_written, to=(S.RUNNING,))
rule((S.IDLE,), (Tick,), fit.on_tick)

# ---- ignored on purpose, with the reason ---------------------------------------------------------------------
ignore(TERMINAL, [e for e in EVENTS if e is not Start],
       "the final decision is made: the supervisor exits after this turn (only a new run decides again)")
ignore((S.IDLE, S.PAUSED, S.STOP_PENDING, S.STOPPING, S.BACKOFF, S.COOLING, S.NO_SPACE, S.REQUEUING), (Reconfigured,),
       "the new config governs every later decision; a lowered target is checked at the next epoch")
ignore(NO_TRAINER, (EpochStarted, TrainingDone, EpochDone, Activity, EpochProfiled),
       "no trainer runs: a late line or sample of the attempt that ended")
ignore((S.PAUSED,), (Activity,), "the trainer is SIGSTOPped on purpose: idle is expected, not a hang")
ignore((S.STOP_PENDING, S.STOPPING), (Activity,), "a stop is already decided, and its waits are bounded")
ignore((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.STOPPING, S.IDLE, S.BACKOFF, S.COOLING, S.REQUEUING), (DiskSpace,),
       "space is measured only while waiting for it; a late answer changes nothing")
ignore((S.STOP_PENDING, *NO_TRAINER), (CheckpointsInspected,),
       "no attempt is being started (a take-over waits for the other trainer, not for a choice)")
ignore((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.STOPPING, S.COOLING, S.NO_SPACE, S.REQUEUING), (BatchSizeSet,),
       "a step-down is asked for only in BACKOFF, the fit's write only in IDLE; a late result changes nothing")
ignore((S.RUNNING, S.PAUSED, S.STOP_PENDING, S.STOPPING, S.BACKOFF, S.COOLING, S.NO_SPACE, S.REQUEUING),
       (BatchSizeFitted,), "the fit runs only in IDLE, before the first attempt; the answer of a probe that was "
                           "ended (a stop, its time bound) changes nothing")
ignore(NO_TRAINER, (TrainerExited, Remnants, ChildExited), "no attempt runs")
ignore((S.IDLE, S.RUNNING, S.PAUSED, S.STOP_PENDING, S.STOPPING, S.BACKOFF, S.COOLING, S.NO_SPACE),
       (SlurmJobState, Requeued), "SLURM is asked only while requeuing")
ignore((S.RUNNING, S.PAUSED), (Tick,), "no deadline: a running attempt is judged on its lines and samples, "
                                        "a pause on its readings")
ignore((S.COOLING, S.REQUEUING), (Tick,),
       "no deadline: cooling ends on a reading, requeuing on SLURM's answer (bounded by the adapter)")


def _missing() -> list[str]:
    return [f"{st_.name} x {et.__name__}" for st_ in State for et in EVENTS if (st_, et) not in TABLE]


if _missing():
    raise AssertionError("no rule and not ignored: " + ", ".join(_missing()))


def decide(s: Sup, ev, now: float, cfg) -> tuple[Sup, list]:
    entry = TABLE.get((s.state, type(ev)))
    if entry is None:
        raise TypeError(f"no rule for {s.state.value} x {type(ev).__name__}")
    if isinstance(entry, Ignored):
        return s, []
    s2, actions = entry.fn(s, ev, now, cfg)
    _check_move(entry, s, s2, actions, ev)
    return s2, actions


def _check_move(entry: Rule, s: Sup, s2: Sup, actions: list, ev) -> None:
    changes = [x for x in actions if isinstance(x, StateChanged)]
    where = f"{entry.fn.__name__} ({s.state.name} x {type(ev).__name__})"
    if len(changes) > 1:
        raise IllegalMove(f"{where}: {len(changes)} state changes in one decision")
    if not changes:
        if s2.state != s.state:
            raise IllegalMove(f"{where}: moved to {s2.state.name} without transition()")
        return
    ch = changes[0]
    if (ch.old, ch.new) != (s.state.value, s2.state.value):
        raise IllegalMove(f"{where}: StateChanged {ch.old}->{ch.new} but the state went "
                          f"{s.state.value}->{s2.state.value}")
    if s2.state not in entry.targets:
        raise IllegalMove(f"{where}: moved to {s2.state.name}, declared {sorted(x.name for x in entry.targets)}")


def counts() -> tuple[int, int]:
    """(rules, ignored pairs) of the table."""
    n = sum(isinstance(e, Rule) for e in TABLE.values())
    return n, len(TABLE) - n


def lifecycle() -> str:
    """The transition table as text (State.__doc__): every rule, one line per state and event."""
    lines = ["Where the supervised job stands. Rules (generated from policy.TABLE; every other pair is "
             "ignored with its reason, see docs/how-it-decides.md):", ""]
    for state in State:
        for et in EVENTS:
            e = TABLE[(state, et)]
            if isinstance(e, Rule):
                to = ", ".join(x.name for x in sorted(e.targets, key=list(State).index))
                lines.append(f"    {state.name:<12} {et.__name__:<20} {e.summary}" + (f" [-> {to}]" if to else ""))
    return "\n".join(lines)


def markdown() -> str:
    """docs/how-it-decides.md's table: every pair, its rule and targets or why it is ignored."""
    rows = ["| state | event | decision | may move to |", "| --- | --- | --- | --- |"]
    for state in State:
        for et in EVENTS:
            e = TABLE[(state, et)]
            if isinstance(e, Rule):
                to = ", ".join(x.value for x in sorted(e.targets, key=list(State).index)) or "(stays)"
                rows.append(f"| {state.value} | {et.__name__} | {e.summary} | {to} |")
            else:
                rows.append(f"| {state.value} | {et.__name__} | ignored: {e.why} | |")
    return "\n".join(rows)


State.__doc__ = lifecycle()
