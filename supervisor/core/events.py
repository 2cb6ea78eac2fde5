"""What the adapters report to the policy: plain frozen dataclasses, one per kind of happening.

Events are built by adapters from what they measured (a log line, a signal, a process that ended, a
temperature poll, an activity sample, the files in the fold folder) or by the executor as the result of
an action (BatchSizeSet, BatchSizeFitted, ActionFailed, CheckpointsInspected, DiskSpace, SlurmJobState,
Requeued). Each is queued and handed to policy.decide in order; nothing here decides anything. EVENTS lists
them all: the transition table has an entry for every State x event type.
"""
from __future__ import annotations

from dataclasses import dataclass

from supervisor.core.classify import Exit
from supervisor.core.diagnose import EpochProfile
from supervisor.core.training_log import EpochRecord


@dataclass(frozen=True)
class Start:
    """The supervisor starts (again): what it found on disk and in the process table."""
    final_checkpoint: bool = False        # checkpoint_final.pth is there
    validation_done: bool = False         # ... and the final validation's summary.json too
    last_epoch: EpochRecord | None = None  # history replayed from the logs
    batch_size: int | None = None         # what the plans file says now
    n_proc_da: int | None = None          # what the trainer would use now
    leftover_pgid: int | None = None      # a trainer a killed supervisor of ours left behind (-1: find by marker)
    best_checkpoint_ok: bool = False      # checkpoint_best.pth exists and is a complete archive
    slurm_restarts: int | None = None     # SLURM_RESTART_COUNT inside a SLURM job (None outside)
    others: tuple = ()                    # ((pid, command, supervisor, owner), ...): another trainer on this fold,
    #                                       not ours; supervisor: who supervises it ("pid N, state directory D") or
    #                                       ""; owner: its user when we may not signal it, else ""
    take_over: bool = False               # `run --take-over`: stop that trainer at its safe point, continue
    gpu: tuple | None = None              # (uuid, name, total bytes) of the training's GPU from NVML (None: unknown)


@dataclass(frozen=True)
class Reconfigured:
    """The config was reloaded (the new one is the cfg of this and every later decision)."""
    last_epoch: EpochRecord | None = None


@dataclass(frozen=True)
class EpochStarted:
    """An "Epoch N" log line: nnU-Net writes it after the previous epoch's checkpoint saves (a safe point)."""
    epoch: int


@dataclass(frozen=True)
class EpochDone:
    """An epoch's last log line ("Epoch time"); its checkpoint saves follow."""
    record: EpochRecord


@dataclass(frozen=True)
class TrainingDone:
    """"Training done.": checkpoint_final is written, the final validation runs (a safe point)."""


@dataclass(frozen=True)
class Activity:
    """One sample of how busy the attempt's process tree is (for the hang rule)."""
    cpu_share: float | None        # cores used since the previous sample; None before two samples
    gpu_util: float | None = None  # percent, where NVML tells


@dataclass(frozen=True)
class Readings:
    """One poll of the thermal sensors: gpu -> celsius (None = unknown), and GPUs NVML reports lost."""
    temps: tuple[tuple[str, float | None], ...] = ()
    lost: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class GpuFaults:
    """GPU hardware errors NVML reported since the run began: ((NVML index, what), ...). Only new ones
    are reported (uncorrectable ECC errors counted since, a page retirement or row remap pending or
    failed, a hardware Xid event)."""
    faults: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DiskSpace:
    """Free space of the folder checkpoints go to, and the checkpoints there (MeasureDisk's result)."""
    free_bytes: int
    largest_checkpoint: int
    folder: str
    existing: int = 0             # how many checkpoint files the fold holds


@dataclass(frozen=True)
class EpochProfiled:
    """Where one epoch's time went: the launcher's timings plus the machine's samples (profiling.py)."""
    profile: EpochProfile


@dataclass(frozen=True)
class CheckpointsInspected:
    """InspectCheckpoints' result: each checkpoint in the fold folder, in nnU-Net's resume order, with what
    is wrong with it (None: complete, or not verified), and temp files whose writer is dead."""
    found: tuple[tuple[str, str | None], ...] = ()
    stale_temps: tuple[str, ...] = ()
    last_epoch: int | None = None         # from the logs: what a fallback to checkpoint_best costs
    best_epoch: int | None = None
    trained_s: float | None = None        # the lineage's epoch times added up: what a fresh start loses


@dataclass(frozen=True)
class BatchSizeSet:
    """SetBatchSize succeeded: the plans file now says `new`."""
    old: int
    new: int


@dataclass(frozen=True)
class BatchSizeFitted:
    """FitBatchSize's result (the probe child exited, or CancelFit ended it): the probes in order as
    ((batch size, peak bytes or None for a CUDA OOM, seconds), ...), the GPU they ran on, the largest batch
    size the plans can use and why, why the search stopped early, or why there is no answer (error)."""
    table: tuple = ()
    total_bytes: int | None = None
    gpu: str | None = None
    uuid: str | None = None
    upper: int | None = None
    upper_why: str = ""
    stopped: str | None = None
    error: str | None = None
    model: bool = False                   # measured on the memory model (the tests' hook), not on CUDA


@dataclass(frozen=True)
class ActionFailed:
    """Carrying out an action failed in a way that restarting cannot fix (e.g. plans not writable)."""
    action: str
    message: str


@dataclass(frozen=True)
class TrainerExited:
    """The attempt's main process is gone (None: a trainer we did not start, whose status is unknown)."""
    returncode: int | None


@dataclass(frozen=True)
class Remnants:
    """After TrainerExited, once per loop turn: what is left of the attempt."""
    alive: int = 0                        # processes of the attempt still alive
    streams_open: bool = False            # its stdout/stderr not yet at EOF
    gpu_holders: tuple[int, ...] = ()     # of them, those NVML says hold GPU memory


@dataclass(frozen=True)
class ChildExited:
    """The attempt is over and its evidence collected (CollectExit's result)."""
    exit: Exit
    best_checkpoint_ok: bool = True       # checkpoint_best.pth exists and is a complete archive
    log: str | None = None                # the attempt's log (its whole output), where there is one


@dataclass(frozen=True)
class Signalled:
    """A signal reached the supervisor; what it means is the policy's (criteria.signal_meaning)."""
    signame: str = "SIGTERM"
    in_slurm: bool = False                # the supervisor runs inside a SLURM job


@dataclass(frozen=True)
class SlurmJobState:
    """QuerySlurmJob's result: the job's JobState in SLURM (None: could not be read)."""
    state: str | None


@dataclass(frozen=True)
class Requeued:
    """Requeue's result: "requeued" or "failed"."""
    result: str
    message: str = ""


@dataclass(frozen=True)
class Tick:
    """Time passed (deadlines are checked against the monotonic `now` of every decision)."""


EVENTS = (Start, Reconfigured, EpochStarted, EpochDone, TrainingDone, Activity, Readings, GpuFaults, DiskSpace,
          EpochProfiled,
          CheckpointsInspected, BatchSizeSet, BatchSizeFitted, ActionFailed, TrainerExited, Remnants, ChildExited,
          Signalled,
          SlurmJobState, Requeued, Tick)
