"""Which of a queue's pending jobs may start now, and on which GPU slot (pure: core/queue_policy.py asks).

How it works: `schedule` walks the pending jobs in queue order and gives each a free slot unless a gate
holds it back; every gate says why, so `status` can show what a job waits for (`Gates.why`):
- a cascade stage waits until every queued fold of its previous stage (3d_lowres) is done: each lowres
  fold's validation writes the predictions of its own validation cases, and a cascade fold trains on all
  of them (core/cascade.py);
- folds started together race while nnunetv2 before 2.6 unpacks the preprocessed data at start
  (core/known_bad.unpacks_at_start): with `stagger` on, only the first job of a data group (jobs that
  share a preprocessed folder) starts; the others wait until it is past data loading (its first epoch
  started) or until its deadline (STAGGER_LIMIT_S, so a first job that never gets there does not hold the
  queue for ever);
- a slot that holds an unhealthy GPU (a job ended with outcome gpu_unhealthy: NVML ECC / retired pages /
  Xid) is never used again by this master; jobs wait for a healthy one (`healthy`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

CASCADE, LOWRES = "3d_cascade_fullres", "3d_lowres"
STAGGER_LIMIT_S = 3600  # the longest a first job may take to unpack its data before the others start anyway


@dataclass(frozen=True)
class Job:
    configuration: str
    fold: object

    @property
    def key(self) -> str:
        return f"{self.configuration}/{self.fold}"


def jobs(cfg) -> list[Job]:
    q = cfg.queue
    confs = list(q.configurations) or [cfg.training.configuration]
    folds = list(q.folds) or [cfg.training.fold]
    # configurations in the given order, cascade stages after their lowres stage
    confs.sort(key=lambda c: c == CASCADE)
    return [Job(c, f) for c in confs for f in folds]


def is_queue(cfg) -> bool:
    return len(jobs(cfg)) > 1 or len(cfg.queue.gpus) > 1


def slot_devices(slot) -> set[str]:
    """The CUDA_VISIBLE_DEVICES entries of a slot ("0,1" -> {"0", "1"}); None (the default) -> set()."""
    return {d.strip() for d in str(slot).split(",") if d.strip()} if slot is not None else set()


def healthy(slots, bad_slots) -> list:
    return [s for s in slots if s not in bad_slots]


@dataclass(frozen=True)
class Gates:
    """What holds jobs back besides free slots (the queue's state, as schedule needs it)."""
    stagger: bool = False                 # nnunetv2 before 2.6: one job per data group until it loaded
    group_of: dict = field(default_factory=dict)   # key -> data group (its preprocessed folder)
    loaded: frozenset = frozenset()       # data groups past data loading (or whose wait ran out)
    running: tuple = ()                   # keys holding a slot now
    why: dict = field(default_factory=dict)  # filled by schedule: key -> why it waits


def schedule(pending: list[Job], done: set[str], free_slots: list, stopping: bool,
             queued: set[str] | None = None, gates: Gates | None = None) -> list[tuple[Job, object]]:
    """Which pending jobs start now on which free slots (in queue order). A cascade fold starts only once
    every queued fold of its 3d_lowres stage is done (`queued`: every job's key); with `gates.stagger`
    only one job per data group starts until that group is loaded. `gates.why` says why each waits."""
    if stopping:
        return []
    queued = {p.key for p in pending} if queued is None else queued
    gates = gates or Gates()
    lows = [k for k in queued if k.startswith(LOWRES + "/")]
    out, slots = [], list(free_slots)
    busy_groups = {gates.group_of.get(k) for k in gates.running}
    for j in pending:
        if j.configuration == CASCADE and (waiting := [k for k in lows if k not in done]):
            gates.why[j.key] = f"waits for {', '.join(sorted(waiting))} (their validation writes its input)"
            continue
        g = gates.group_of.get(j.key)
        if gates.stagger and g is not None and g not in gates.loaded and g in busy_groups:
            first = next((k for k in (*gates.running, *(x.key for x, _s in out)) if gates.group_of.get(k) == g), "")
            gates.why[j.key] = (f"waits until {first} is past data loading (nnunetv2 before 2.6 unpacks "
                                f"{g} at start: jobs started together race there)")
            continue
        if not slots:
            gates.why[j.key] = "waits for a free GPU slot"
            continue
        out.append((j, slots.pop(0)))
        busy_groups.add(g)
    return out
