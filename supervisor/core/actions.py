"""What the policy asks the adapters to do: plain frozen dataclasses, carried out by daemon/executor.py.

An action whose result matters to the next decision reports it as an event (named in its docstring),
queued like any other. `StateChanged` is the one record of a move between states: only
policy.transition creates it, and notifications, metrics and the progress picture react to it (and to
the other actions), never to log event names.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StateChanged:
    """The job moved from `old` to `new` (State values) because of `cause` (a Reason or an outcome)."""
    old: str
    new: str
    cause: str
    attempt: int
    detail: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class InspectCheckpoints:
    """Look at the fold's checkpoints (verify each when `verify`); reports CheckpointsInspected."""
    verify: bool = True


@dataclass(frozen=True)
class MoveAside:
    """Rename a checkpoint to <name>.corrupt-<time> (never delete); ActionFailed when it cannot be moved."""
    file: str
    why: str


@dataclass(frozen=True)
class RemoveStaleTemps:
    """Delete temp files an atomic checkpoint writer left when it was killed (ours; their writer is dead)."""
    files: tuple[str, ...]


@dataclass(frozen=True)
class Spawn:
    """Start the trainer: `--c` when `resume` (nnU-Net then loads `resume_from`), `--val` when validate_only,
    after moving the unreadable checkpoints in `move_aside` ((file, why), ...) out of nnU-Net's way.
    Reports ActionFailed (and starts nothing) when one cannot be moved, ChildExited (exit 127) when the
    program cannot be started."""
    resume_from: str | None = None
    resume: bool = False
    validate_only: bool = False
    move_aside: tuple = ()


@dataclass(frozen=True)
class Adopt:
    """Make another trainer on this fold (not started by us) the current attempt, to stop it at its safe point."""
    pids: tuple[int, ...]


@dataclass(frozen=True)
class MeasureDisk:
    """Measure the free space where checkpoints go; reports DiskSpace."""


@dataclass(frozen=True)
class SignalGroup:
    sig: int


@dataclass(frozen=True)
class KillRemnants:
    """The trainer exited: SIGKILL what is left of its attempt (its group, marked and known processes)."""


@dataclass(frozen=True)
class AttemptEnded:
    """Record why the attempt ended (state.json's attempt record, the log)."""
    attempt: int
    reason: str
    exit_code: int | None
    expected: bool = True   # not a failure the supervisor restarts after
    evidence: str | None = None  # what the exit itself said, where a requested stop overrules it


@dataclass(frozen=True)
class CollectExit:
    """Close the attempt: read its last log lines and stderr evidence; reports ChildExited."""


@dataclass(frozen=True)
class StopLeftover:
    """Stop a trainer a killed supervisor left behind (its whole tree), before anything starts."""
    pgid: int


@dataclass(frozen=True)
class Log:
    event: str
    level: str = "info"
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finish:
    code: int


@dataclass(frozen=True)
class SetBatchSize:
    """Write the plans file; reports BatchSizeSet or ActionFailed. The OOM step-down only lowers; the fit
    (`fit`) writes its choice up or down, but only while the file still says `old`."""
    old: int
    new: int
    fit: bool = False


@dataclass(frozen=True)
class FitBatchSize:
    """Probe the training step at increasing batch sizes in a child (trainer/fit_probe.py), bounded by
    max_seconds; reports BatchSizeFitted when the child exits."""
    batch_size: int                       # the plans' size: where the search starts
    headroom: float
    iterations: int
    max_seconds: float


@dataclass(frozen=True)
class CancelFit:
    """End the fit's probe child; `report`: post BatchSizeFitted with what it measured so far."""
    report: bool = False


@dataclass(frozen=True)
class SetWorkers:
    """Record the new nnUNet_n_proc_DA (passed to the next attempt's environment)."""
    old: int
    new: int


@dataclass(frozen=True)
class SetCompile:
    """Record that torch.compile is off from now on (nnUNet_compile=f in every later attempt's environment)
    and why: the change a person sees in the history and `status`, and reverts with training.compile."""
    why: str


@dataclass(frozen=True)
class Reload:
    """Re-read config.toml; reports Reconfigured (a bad file is logged and changes nothing)."""


@dataclass(frozen=True)
class QuerySlurmJob:
    """Ask SLURM for this job's JobState (`scontrol show job`); reports SlurmJobState."""


@dataclass(frozen=True)
class Requeue:
    """Ask SLURM to run this job again (`scontrol requeue JOB`); reports Requeued."""


@dataclass(frozen=True)
class Diagnosed:
    """The bottleneck verdict changed (diagnose.Verdict.to_json()): worth telling a person."""
    verdict: dict
