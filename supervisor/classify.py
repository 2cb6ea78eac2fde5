"""Why did a training attempt end? A pure function over what the supervisor observed.

How it works: `classify(Exit) -> Reason` looks, in a fixed order, at (1) what the supervisor itself asked
for (a target stop, an operator stop), (2) a clean finish (exit 0 and checkpoint_final.pth), (3) the
stderr tail matched against SIGNATURES, a table of (reason, regex) kept as data in the spirit of
accelerate's `should_reduce_batch_size`, and (4) the raw exit status (SIGKILL that nobody sent = host
OOM). Stderr is the evidence: nnU-Net can die of the same CUDA OOM with exit 1 or with SIGABRT
(-6, "terminate called without an active exception" from the augmenter threads), so the code alone
cannot tell.

The order of SIGNATURES matters: configuration errors first (restarting cannot help), then OOM kinds,
then a checkpoint that cannot be read.
"""
from __future__ import annotations

import enum
import re
import signal
from dataclasses import dataclass


class Reason(str, enum.Enum):
    """Why one attempt ended. Restartable reasons are in RESTARTABLE."""

    COMPLETED = "completed"            # exit 0 and checkpoint_final.pth exists
    TARGET_REACHED = "target_reached"  # we sent SIGINT at the Dice target
    STOPPED = "stopped"                # the operator asked (SIGTERM/SIGINT to the supervisor)
    CRASH = "crash"                    # anything else that died
    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"              # host RAM: allocator failure or a SIGKILL nobody sent
    CONFIG_ERROR = "config_error"      # dataset/trainer/plans missing, bad arguments
    CORRUPT_CHECKPOINT = "corrupt_checkpoint"  # --c could not read the checkpoint
    HANG = "hang"                      # no epoch progress and an idle process tree: we stopped it
    DIVERGED = "diverged"              # non-finite loss/Dice epochs in a row: we stopped it
    PLATEAU = "plateau"                # no new best EMA for patience_epochs: we stopped it
    THERMAL_STOP = "thermal_stop"      # too hot (or paused too long): we stopped it; restart when cool
    SENSOR_LOST = "sensor_lost"        # no temperature readings: we stopped it; restart when readable
    GPU_LOST = "gpu_lost"              # NVML: the GPU fell off the bus: we stopped it
    DISK_FULL = "disk_full"            # ENOSPC writing a checkpoint: wait for space, then resume


RESTARTABLE = frozenset({Reason.CRASH, Reason.CUDA_OOM, Reason.HOST_OOM, Reason.CORRUPT_CHECKPOINT,
                         Reason.HANG, Reason.GPU_LOST})
# Why WE stopped an attempt -> the reason it ended with, whatever its exit status says.
INTENTS = {"target": Reason.TARGET_REACHED, "operator": Reason.STOPPED, "hang": Reason.HANG,
           "diverged": Reason.DIVERGED, "plateau": Reason.PLATEAU, "thermal": Reason.THERMAL_STOP,
           "sensor": Reason.SENSOR_LOST, "gpu_lost": Reason.GPU_LOST}

# (reason, pattern) in priority order. Patterns are matched against the stderr tail (and stdout tail,
# because nnU-Net prints some errors there).
SIGNATURES: list[tuple[Reason, re.Pattern]] = [
    (Reason.CONFIG_ERROR, re.compile(p)) for p in (
        r"Could not find requested nnunet trainer",
        r"The requested nnunet trainer class must inherit",
        r"Could not find a dataset with the ID",
        r"More than one dataset name found for dataset id",
        r"dataset_name_or_id (?:must either be|was a string)",
        r"Requested configuration \S+ not found in plans",
        r"(?i)FileNotFoundError: .*(?:plans\w*|dataset|dataset_fingerprint|splits_final)\.json",
        r"Unable to convert given value for fold",
        r"(?m)^\S+: error: (?:the following arguments are required|unrecognized arguments|argument )",
        r"(?m)^cannot execute ",            # the training command itself could not be started
    )
] + [
    (Reason.CUDA_OOM, re.compile(p)) for p in (
        r"torch\.(?:cuda\.)?OutOfMemoryError",
        r"CUDA out of memory",
        r"CUBLAS_STATUS_ALLOC_FAILED",
        r"CUDNN_STATUS_NOT_INITIALIZED",
        r"CUDNN_STATUS_ALLOC_FAILED",
        r"cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",  # commonly OOM on handle creation
        r"CUDA error: out of memory",
        r"MPS backend out of memory",
    )
] + [
    (Reason.HOST_OOM, re.compile(p)) for p in (
        r"DefaultCPUAllocator: can't allocate memory",
        r"DefaultCPUAllocator: not enough memory",
        r"\bMemoryError",
        r"Cannot allocate memory",
    )
] + [
    (Reason.CORRUPT_CHECKPOINT, re.compile(p)) for p in (
        r"PytorchStreamReader failed reading zip archive",
        r"failed finding central directory",
        r"_pickle\.UnpicklingError",
        r"invalid load key",
        r"Ran out of input",
        r"file in archive is not in a subdirectory",
    )
]


@dataclass(frozen=True)
class Exit:
    """What the supervisor knows about one ended attempt."""

    returncode: int | None          # Popen convention: -N for death by signal N
    stderr_tail: str = ""
    stop_intent: "Reason | str | None" = None  # why WE asked it to stop (a Reason, or a key of INTENTS)
    we_killed: bool = False         # we sent SIGKILL (stop escalation)
    final_checkpoint: bool = False  # checkpoint_final.pth exists after the exit
    oom_kills_delta: int | None = None  # cgroup memory.events oom_kill increase, None = unknown


def match_signature(text: str) -> Reason | None:
    for reason, rx in SIGNATURES:
        if rx.search(text):
            return reason
    return None


def classify(x: Exit) -> Reason:
    if isinstance(x.stop_intent, Reason):
        return x.stop_intent
    if x.stop_intent in INTENTS:
        return INTENTS[x.stop_intent]
    if x.returncode == 0 and x.final_checkpoint:
        return Reason.COMPLETED
    found = match_signature(x.stderr_tail)
    if found is not None:
        return found
    if x.returncode == -signal.SIGKILL and not x.we_killed:
        # The kernel OOM killer sends SIGKILL. When cgroup accounting says no OOM kill happened,
        # somebody else killed it: a crash, restartable all the same.
        return Reason.CRASH if x.oom_kills_delta == 0 else Reason.HOST_OOM
    return Reason.CRASH
