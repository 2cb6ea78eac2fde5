"""The queue's decisions, as a pure function: decide_queue(q, event, now, cfg) -> (q', actions).

A queue ([queue]: configurations x folds on GPU slots) runs one ordinary single-job supervisor per job;
the queue master (daemon/queue_master.py) only starts them, watches them exit, forwards signals and keeps
queue.json. What that means is decided here, with the same vocabulary as the single job:
- a job's supervisor that ended with one of its own exit codes (0, 2, 3, 4) ended for the reason the code
  says; one that died otherwise (a bug, the kernel's OOM killer) is started again after the restart
  backoff (criteria.backoff_delay), at most CHILD_RETRIES times; its new supervisor stops the old
  trainer by marker and continues with --c;
- exit 0 without a finished training (its state is not target_reached/completed) is "stopped";
- a configuration error stops the queue; a give-up stops it when [queue] on_give_up = "stop";
- a signal means what it means to a single job (criteria.signal_meaning): SIGTERM/SIGINT stop every job
  gracefully (forwarded; a second forces, a third kills, in each job), SIGHUP reloads every job,
  SIGUSR1 outside SLURM is ignored;
- `schedule` (core/queue_schedule.py) picks which pending jobs start on which free slots: a cascade fold
  once every queued 3d_lowres fold is done; with nnunetv2 before 2.6 (it unpacks the preprocessed data at
  start, and folds started together race there) one job per data group until its first epoch started
  (JobPastDataLoading) or STAGGER_LIMIT_S passed; never on a slot that holds an unhealthy GPU;
- a job that ended because its GPU is unhealthy (outcome gpu_unhealthy, JobExited.unhealthy_gpus from its
  state.json) is not a give-up: its slot is retired and the job waits for a healthy one (resuming with
  --c); when no healthy slot is left, the jobs that cannot start are `no_healthy_gpu` and the queue ends
  (exit 3) saying so; both are notified (QNotice);
- a master started again after its own death (SIGKILL) adopts the job supervisors that still run (their
  lock is held) on the slots they hold: it watches them, forwards signals to them, never starts a
  second supervisor or trainer for them, and reads their outcome from their state when they end;
- nnUNetv2_find_best_configuration, when asked for, runs once every job is over (FINISHING) as a child
  the master polls, bounded by FIND_BEST_LIMIT_S; a stop request ends it.
Every (QState, event) pair has a rule or an explicit "ignored" in QUEUE_TABLE.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from supervisor.core import criteria, known_bad
from supervisor.core.actions import Log
from supervisor.core.exit_codes import ExitCode
from supervisor.core.queue_events import (FindBestExited, Forward, JobExited, JobPastDataLoading, Launch, QFinish,
                                          QNotice, QSignalled, QStart, QTick, RunFindBest, StopFindBest)
from supervisor.core.queue_schedule import STAGGER_LIMIT_S, Gates, Job, healthy, is_queue, jobs, schedule  # noqa: F401

DONE_OUTCOMES = ("target_reached", "completed")
CHILD_RETRIES = 3  # a job whose supervisor process itself died is started again at most this often
FIND_BEST_LIMIT_S = 6 * 3600  # nnUNetv2_find_best_configuration: ensembles of every fold's validation
GPU_UNHEALTHY = "gpu_unhealthy"  # a job's outcome when its supervisor stopped it for GPU hardware errors
NO_HEALTHY_GPU = "no_healthy_gpu"  # a job's queue status when every slot holds an unhealthy GPU


def outcome_of(code: int | None) -> str:
    return {ExitCode.OK: "done", ExitCode.GAVE_UP: "gave_up", ExitCode.CONFIG: "config_error"}.get(code, "failed")


# ---- the queue's state, events and actions ---------------------------------------------------------------
class QState(str, enum.Enum):
    RUNNING = "running"      # starting and watching jobs
    STOPPING = "stopping"    # no new job starts; waiting for the running ones to end
    FINISHING = "finishing"  # every job is over; nnUNetv2_find_best_configuration runs
    DONE = "done"


@dataclass(frozen=True)
class Queue:
    state: QState = QState.RUNNING
    order: tuple = ()                                 # Job, in queue order
    slots: tuple = (None,)                            # GPU slots (None: the machine's default)
    status: dict = field(default_factory=dict)        # key -> pending/running/retrying/done/stopped/gave_up/...
    slot_of: dict = field(default_factory=dict)       # running key -> slot
    codes: dict = field(default_factory=dict)         # key -> its supervisor's last exit status
    retries: dict = field(default_factory=dict)       # key -> times its dead supervisor was started again
    retry_at: dict = field(default_factory=dict)      # key -> monotonic time of that start
    stop_why: str | None = None
    final_code: int | None = None                     # FINISHING: the queue's exit status, decided
    find_best_deadline: float | None = None           # FINISHING: stop nnUNetv2_find_best_configuration then
    stagger: bool = False                             # nnunetv2 before 2.6: one job per data group at first
    group_of: dict = field(default_factory=dict)      # key -> data group (the preprocessed folder it reads)
    loaded: frozenset = frozenset()                   # data groups past data loading (or past their wait)
    load_deadline: dict = field(default_factory=dict)  # data group -> when its first job's wait ends
    slot_gpus: dict = field(default_factory=dict)     # slot -> NVML indices of its GPUs (measured)
    unhealthy: dict = field(default_factory=dict)     # NVML index -> the job that reported it
    bad_slots: tuple = ()                             # slots holding an unhealthy GPU: never used again
    why: dict = field(default_factory=dict)           # pending key -> what it waits for (status shows it)


def _launches(q: Queue, now: float) -> tuple[Queue, list]:
    busy = set(q.slot_of.values())
    free = [s for s in healthy(q.slots, q.bad_slots) if s not in busy]
    done = {k for k, v in q.status.items() if v == "done"}
    status, slot_of, acts = dict(q.status), dict(q.slot_of), []
    lows = [j.key for j in q.order if j.configuration == "3d_lowres"]
    for j in q.order:  # a cascade fold whose 3d_lowres folds did not all finish can never get its input
        ended = [k for k in lows if status[k] not in ("pending", "running", "retrying", "done")]
        if j.configuration == "3d_cascade_fullres" and status[j.key] == "pending" and ended:
            status[j.key] = "skipped"
            acts.append(Log("queue_job_skipped", "warning", {"job": j.key, "why": ", ".join(
                f"{k} {status[k]}" for k in ended) + ": its validation cases have no 3d_lowres prediction"}))
    pending = [j for j in q.order if status[j.key] == "pending"]
    gates = Gates(q.stagger, q.group_of, q.loaded, tuple(slot_of))
    deadlines = dict(q.load_deadline)
    for j, slot in schedule(pending, done, free, q.state != QState.RUNNING, {j.key for j in q.order}, gates):
        status[j.key], slot_of[j.key] = "running", slot
        acts.append(Launch(j.key, slot))
        g = q.group_of.get(j.key)
        if q.stagger and g is not None and g not in q.loaded and g not in deadlines:
            deadlines[g] = now + STAGGER_LIMIT_S
            acts.append(Log("queue_stagger", fields={"job": j.key, "data": g, "limit_s": STAGGER_LIMIT_S,
                                                     "why": "nnunetv2 before 2.6 unpacks the data at start: the "
                                                            "other jobs on it start once this one is past data loading"}))
    if not healthy(q.slots, q.bad_slots):
        for j in q.order:
            if status[j.key] == "pending":
                status[j.key] = NO_HEALTHY_GPU
    why = {k: w for k, w in gates.why.items() if status.get(k) == "pending"}
    return dataclasses.replace(q, status=status, slot_of=slot_of, load_deadline=deadlines, why=why), acts


def _maybe_finish(q: Queue, cfg, now: float) -> tuple[Queue, list]:
    if q.slot_of or q.retry_at or (q.state == QState.RUNNING and any(v == "pending" for v in q.status.values())):
        return q, []
    st = set(q.status.values())
    code = ExitCode.CONFIG if "config_error" in st else ExitCode.GAVE_UP if st & {
        "gave_up", "failed", NO_HEALTHY_GPU} else ExitCode.OK
    fields = {"summary": summary(q.status), "jobs": dict(q.status), "exit_code": int(code)}
    acts: list = []
    if NO_HEALTHY_GPU in st:
        text = (f"no healthy GPU slot is left ({_unhealthy_text(q)}): "
                f"{sum(v == NO_HEALTHY_GPU for v in q.status.values())} job(s) not trained; check the GPUs "
                "(nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER; a reset or reboot clears pending retirements), "
                "then start the queue again: done jobs are skipped, the others resume with --c")
        fields["why"] = text
        acts.append(QNotice(GPU_UNHEALTHY, {"message": "queue ended: " + text, "gpus": sorted(q.unhealthy)}))
    if q.state == QState.RUNNING and cfg.queue.find_best_configuration and "done" in st:
        return dataclasses.replace(q, state=QState.FINISHING, final_code=int(code),
                                   find_best_deadline=now + FIND_BEST_LIMIT_S), [
            Log("queue_jobs_finished", fields={**fields, "then": "nnUNetv2_find_best_configuration"}), *acts,
            RunFindBest()]
    return dataclasses.replace(q, state=QState.DONE), [Log("queue_finished", fields=fields), *acts,
                                                       QFinish(int(code))]


def _unhealthy_text(q: Queue) -> str:
    return "; ".join(f"GPU {g} (reported by {k})" for g, k in sorted(q.unhealthy.items())) or \
        "the slots' GPUs reported hardware errors"


def summary(status: dict) -> str:
    """How the queue's jobs ended, in a few words: "2/2 jobs done", "1/2 jobs done; 3d_fullres/1 gave_up"."""
    done = [k for k, v in status.items() if v == "done"]
    rest = "; ".join(f"{k} {v}" for k, v in status.items() if v != "done")
    return f"{len(done)}/{len(status)} jobs done" + (f"; {rest}" if rest else "")


def on_start(q: Queue, ev: QStart, now, cfg):
    """skip what is done; adopt the job supervisors still running on their slots; start what fits (one job
    per data group first with nnunetv2 before 2.6)"""
    group_of = {k: g for k, g in ev.data if g}
    # nnunetv2 2.6+ reads blosc2 in place, but data preprocessed as .npz (by an older nnunetv2) is still
    # converted to .npy by every trainer at start (nnUNetDatasetNumpy.unpack_dataset): the same race
    stagger = bool(group_of) and (known_bad.unpacks_at_start(ev.nnunetv2) or ev.npz_data)
    q = dataclasses.replace(q, stagger=stagger, group_of=group_of,
                            loaded=frozenset(group_of[k] for k in ev.past_data_loading if k in group_of),
                            slot_gpus={s: tuple(g) for s, g in ev.slot_gpus})
    status = {j.key: ("done" if j.key in ev.already_done else "pending") for j in q.order}
    acts = [Log("queue_job_skipped", fields={"job": k, "why": "already done"}) for k in ev.already_done]
    slot_of = {}
    for key, slot in ev.running:
        if key in status:  # a job of another queue (the config changed) is not ours to watch
            status[key], slot_of[key] = "running", slot
            acts.append(Log("queue_job_adopted", "warning", {"job": key, "gpu": slot,
                                                             "why": "its supervisor still runs (this master was restarted)"}))
    q, more = _launches(dataclasses.replace(q, status=status, slot_of=slot_of), now)
    q, fin = _maybe_finish(q, cfg, now)
    return q, [*acts, *more, *fin]


def _gpu_fault(q: Queue, ev: JobExited) -> tuple[Queue, list]:
    """Retire the slot the job ran on and every slot holding a GPU it reported; tell a person."""
    unhealthy = {**q.unhealthy, **{int(g): ev.key for g in ev.unhealthy_gpus if int(g) not in q.unhealthy}}
    origin = q.slot_of.get(ev.key, "unknown")
    bad = tuple(s for s in q.slots if s in q.bad_slots or s == origin
                or set(q.slot_gpus.get(s, ())) & set(unhealthy))
    left = healthy(q.slots, bad)
    gpus = ", ".join(str(g) for g in sorted(ev.unhealthy_gpus)) or "?"
    text = (f"{ev.key} stopped for GPU hardware errors on GPU {gpus} (slot {origin}): no job starts on "
            + ", ".join(str(s) for s in bad if s not in q.bad_slots) + " again; "
            + (f"{ev.key} waits for a healthy slot ({', '.join(str(s) for s in left)}) and resumes with --c"
               if left else "no healthy slot is left: the queue ends once the running jobs end"))
    q = dataclasses.replace(q, unhealthy=unhealthy, bad_slots=bad)
    return q, [Log("queue_gpu_unhealthy", "error", {"job": ev.key, "gpus": sorted(ev.unhealthy_gpus),
                                                     "retired_slots": [s for s in bad], "healthy_slots": left}),
               QNotice(GPU_UNHEALTHY, {"message": text, "gpus": sorted(unhealthy), "job": ev.key})]


def on_job_exited(q: Queue, ev: JobExited, now, cfg):
    """a job ended: its outcome; a dead job supervisor is retried after backoff; a config error (or a give-up
    with on_give_up = "stop") stops the queue; then start what fits"""
    acts: list = []
    if ev.past_data_loading and q.group_of.get(ev.key) is not None:
        q = dataclasses.replace(q, loaded=q.loaded | {q.group_of[ev.key]})
    fault = ev.outcome == GPU_UNHEALTHY and ev.code == ExitCode.GAVE_UP
    if fault:
        q, acts = _gpu_fault(q, ev)
    slot_of, codes = dict(q.slot_of), {**q.codes, ev.key: ev.code}
    slot_of.pop(ev.key, None)
    status, retries, retry_at = dict(q.status), dict(q.retries), dict(q.retry_at)
    own = ev.code in tuple(int(c) for c in ExitCode if c != ExitCode.INTERNAL)
    if not own and q.state == QState.RUNNING and retries.get(ev.key, 0) < CHILD_RETRIES:
        retries[ev.key] = retries.get(ev.key, 0) + 1
        delay = criteria.backoff_delay(retries[ev.key], cfg)
        retry_at[ev.key] = now + delay
        # the slot stays the job's: its dead supervisor's trainer may still be on that GPU until the new
        # supervisor stops it (by its marker) before starting anything
        slot_of[ev.key] = q.slot_of.get(ev.key)
        status[ev.key] = "retrying"
        acts.append(Log("queue_job_supervisor_died", "error", {"job": ev.key, "exit_code": ev.code,
                                                               "retry": retries[ev.key], "of": CHILD_RETRIES,
                                                               "in_s": round(delay, 1)}))
        q = dataclasses.replace(q, status=status, slot_of=slot_of, codes=codes, retries=retries, retry_at=retry_at)
        q, more = _launches(q, now)
        return q, [*acts, *more]
    outcome = "pending" if fault else outcome_of(ev.code)
    if outcome == "done" and not ev.finished:
        outcome = "stopped"  # exit 0 without a finished training: stopped or preempted
    status[ev.key] = outcome
    acts.append(Log("queue_job_ended", "info" if outcome in ("done", "stopped") else "error",
                    {"job": ev.key, "exit_code": ev.code, "outcome": ev.outcome if fault else outcome}))
    q = dataclasses.replace(q, status=status, slot_of=slot_of, codes=codes, retries=retries, retry_at=retry_at)
    if q.state == QState.RUNNING and (outcome == "config_error" or (
            outcome not in ("done", "pending") and cfg.queue.on_give_up == "stop")):
        q = dataclasses.replace(q, state=QState.STOPPING, stop_why=f"{ev.key}: {outcome}")
        acts += [Log("queue_stopping", "warning", {"why": q.stop_why, "running": sorted(slot_of)})]
        if slot_of:
            acts.append(Forward("SIGTERM"))
    q, more = _launches(q, now)
    q, fin = _maybe_finish(q, cfg, now)
    return q, [*acts, *more, *fin]


def on_past_data_loading(q: Queue, ev: JobPastDataLoading, now, cfg):
    """its data group is unpacked: the jobs that waited for it may start; start what fits"""
    g = q.group_of.get(ev.key)
    if g is None or g in q.loaded:
        return q, []
    q = dataclasses.replace(q, loaded=q.loaded | {g})
    q, more = _launches(q, now)
    return q, [Log("queue_data_loaded", fields={"job": ev.key, "data": g}), *more]


def on_signal(q: Queue, ev: QSignalled, now, cfg):
    """what it means to a single job: stop every job gracefully (forwarded), reload every job, or ignore"""
    meaning = criteria.signal_meaning(ev.signame, ev.in_slurm)
    if meaning == "ignore":
        return q, [Log("signal_ignored", fields={"signal": ev.signame, "why": "not inside a SLURM job"})]
    running = [k for k in q.slot_of if k not in q.retry_at]
    if meaning == "reload":
        return q, [Forward(ev.signame)] if running else []
    acts = [Forward(ev.signame)] if running else []
    if q.state == QState.RUNNING:
        # a job waiting to be retried is not started again: failed (its next run stops a leftover trainer)
        status = {**q.status, **{k: "failed" for k in q.retry_at}}
        slot_of = {k: v for k, v in q.slot_of.items() if k not in q.retry_at}
        q = dataclasses.replace(q, state=QState.STOPPING, stop_why=ev.signame, retry_at={}, status=status,
                                slot_of=slot_of)
        acts.insert(0, Log("queue_stopping", fields={"signal": ev.signame, "running": sorted(slot_of)}))
    q, fin = _maybe_finish(q, cfg, now)
    return q, [*acts, *fin]


def on_tick(q: Queue, ev: QTick, now, cfg):
    """a dead job's backoff is over -> start it again; start what fits"""
    late = sorted(g for g, t in q.load_deadline.items() if g not in q.loaded and now >= t)
    acts: list = [Log("queue_stagger_timeout", "warning", {"data": g, "after_s": STAGGER_LIMIT_S,
                                                           "effect": "the waiting jobs start anyway"}) for g in late]
    q = dataclasses.replace(q, loaded=q.loaded | set(late)) if late else q
    due = [k for k, t in q.retry_at.items() if now >= t]
    if not due:
        q, more = _launches(q, now)
        return q, [*acts, *more]
    retry_at = {k: t for k, t in q.retry_at.items() if k not in due}
    status, slot_of = dict(q.status), dict(q.slot_of)
    for k in due:  # on the slot it kept
        status[k] = "running"
        acts.append(Launch(k, slot_of.get(k)))
    q, more = _launches(dataclasses.replace(q, status=status, slot_of=slot_of, retry_at=retry_at), now)
    return q, [*acts, *more]


def on_signal_finishing(q: Queue, ev: QSignalled, now, cfg):
    """a stop ends nnUNetv2_find_best_configuration (the jobs are over); a reload or SIGUSR1 is ignored"""
    if criteria.signal_meaning(ev.signame, ev.in_slurm) in ("ignore", "reload"):
        return q, [Log("signal_ignored", fields={"signal": ev.signame, "why": "only find_best_configuration runs"})]
    return q, [StopFindBest(f"{ev.signame} to the queue")]


def on_tick_finishing(q: Queue, ev: QTick, now, cfg):
    """nnUNetv2_find_best_configuration past FIND_BEST_LIMIT_S -> stopped"""
    if q.find_best_deadline is not None and now >= q.find_best_deadline:
        return dataclasses.replace(q, find_best_deadline=None), [
            StopFindBest(f"still running after {FIND_BEST_LIMIT_S / 3600:g} h")]
    return q, []


def on_find_best_exited(q: Queue, ev: FindBestExited, now, cfg):
    """the queue's exit status as decided when the jobs ended (find_best_configuration is an extra)"""
    code = q.final_code if q.final_code is not None else int(ExitCode.OK)
    return dataclasses.replace(q, state=QState.DONE), [
        Log("find_best_configuration_finished", "info" if ev.code == 0 else "error", {"exit_code": ev.code}),
        Log("queue_finished", fields={"summary": summary(q.status), "jobs": dict(q.status), "exit_code": code,
                                      "find_best_configuration_exit_code": ev.code}),
        QFinish(code)]


@dataclass(frozen=True)
class QIgnored:
    why: str


QEVENTS = (QStart, JobExited, JobPastDataLoading, QSignalled, QTick, FindBestExited)
_NOT_YET = QIgnored("find_best_configuration starts only once every job is over (FINISHING)")
_FINAL = QIgnored("the final decision is made: the master exits after this turn")
QUEUE_TABLE = {
    (QState.RUNNING, QStart): on_start,
    (QState.RUNNING, JobExited): on_job_exited,
    (QState.RUNNING, QSignalled): on_signal,
    (QState.RUNNING, QTick): on_tick,
    (QState.STOPPING, QStart): QIgnored("a queue starts RUNNING; a start while stopping cannot happen"),
    (QState.STOPPING, JobExited): on_job_exited,
    (QState.STOPPING, QSignalled): on_signal,
    (QState.STOPPING, QTick): QIgnored("while stopping no job is started, not even a dead one's retry"),
    (QState.RUNNING, FindBestExited): _NOT_YET, (QState.STOPPING, FindBestExited): _NOT_YET,
    (QState.RUNNING, JobPastDataLoading): on_past_data_loading,
    (QState.STOPPING, JobPastDataLoading): QIgnored("while stopping no job is started: nothing waits for the data"),
    (QState.FINISHING, JobPastDataLoading): QIgnored("every job is over"),
    (QState.DONE, JobPastDataLoading): QIgnored("the final decision is made: the master exits after this turn"),
    (QState.FINISHING, QStart): QIgnored("a queue starts RUNNING"),
    (QState.FINISHING, JobExited): QIgnored("every job ended before find_best_configuration started"),
    (QState.FINISHING, QSignalled): on_signal_finishing,
    (QState.FINISHING, QTick): on_tick_finishing,
    (QState.FINISHING, FindBestExited): on_find_best_exited,
    (QState.DONE, QStart): _FINAL, (QState.DONE, JobExited): _FINAL, (QState.DONE, QSignalled): _FINAL,
    (QState.DONE, QTick): _FINAL, (QState.DONE, FindBestExited): _FINAL,
}
assert set(QUEUE_TABLE) == {(s, e) for s in QState for e in QEVENTS}, "every queue state x event needs an entry"


def decide_queue(q: Queue, ev, now: float, cfg) -> tuple[Queue, list]:
    try:
        rule = QUEUE_TABLE[(q.state, type(ev))]
    except KeyError:
        raise TypeError(f"no queue rule for {q.state.value} x {type(ev).__name__}") from None
    return (q, []) if isinstance(rule, QIgnored) else rule(q, ev, now, cfg)
