"""What the queue master reports to the queue's policy (events) and what the policy asks it to do (actions):
plain frozen dataclasses, as core/events.py and core/actions.py are for a single job.

How they are used: daemon/queue_master.py measures (job exits and what their state.json says, signals,
time, a job's first epoch) and reports these events to core/queue_policy.decide_queue, then carries out
the actions it returns (Launch, Forward, QFinish, QNotice, RunFindBest, StopFindBest, and core.actions.Log).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QStart:
    already_done: tuple = ()      # keys whose state says target_reached/completed (a restarted service)
    running: tuple = ()           # (key, slot) of job supervisors still running (a master started again)
    nnunetv2: str | None = None   # the trainer environment's nnunetv2 (None: unknown)
    data: tuple = ()              # (key, data group): jobs that read the same preprocessed folder
    past_data_loading: tuple = ()  # keys whose state shows a started epoch (their data is unpacked)
    slot_gpus: tuple = ()         # (slot, (NVML index, ...)) where NVML could tell
    npz_data: bool = False        # a data group holds .npz cases: nnunetv2 2.6+ converts them to .npy at start too


@dataclass(frozen=True)
class JobExited:
    key: str
    code: int | None
    finished: bool                # its state.json says target_reached or completed
    outcome: str | None = None    # its state.json's outcome (gpu_unhealthy: its GPU failed, not the job)
    unhealthy_gpus: tuple = ()    # its state.json's sup.unhealthy_gpus: NVML indices with hardware errors
    past_data_loading: bool = False  # its state.json shows a started epoch


@dataclass(frozen=True)
class JobPastDataLoading:
    """A running job's state.json shows its first epoch started: its data group is unpacked."""
    key: str


@dataclass(frozen=True)
class QSignalled:
    signame: str
    in_slurm: bool = False


@dataclass(frozen=True)
class QTick:
    pass


@dataclass(frozen=True)
class FindBestExited:
    code: int | None              # None: it could not be started


@dataclass(frozen=True)
class Launch:
    key: str
    slot: object


@dataclass(frozen=True)
class Forward:
    """Send the signal to every running job's supervisor."""
    signame: str


@dataclass(frozen=True)
class QFinish:
    code: int


@dataclass(frozen=True)
class QNotice:
    """Tell a person ([notify]): `kind` is a notification kind, `fields` its details (with `message`)."""
    kind: str
    fields: dict


@dataclass(frozen=True)
class RunFindBest:
    """Start nnUNetv2_find_best_configuration over the configurations and folds that are done."""


@dataclass(frozen=True)
class StopFindBest:
    why: str
