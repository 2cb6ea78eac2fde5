"""Why did a training attempt end? A pure function over what the supervisor observed.

How it works: `classify(Exit) -> Reason` looks, in a fixed order, at (1) what the supervisor itself asked
for (a target stop, an operator stop), (2) a clean finish (exit 0 and checkpoint_final.pth), (3) the
FINAL error in the stderr tail matched against SIGNATURES, a table of (reason, regex) kept as data in the
spirit of accelerate's `should_reduce_batch_size`, and (4) the raw exit status (SIGKILL that nobody sent
= host OOM). Stderr is the evidence: nnU-Net can die of the same CUDA OOM with exit 1 or with SIGABRT
(-6, "terminate called without an active exception" from the augmenter threads), so the code alone
cannot tell.

The final error (`final_error`), not any mention: a trainer may print an OutOfMemoryError it recovered
from and die later of something else. The tail is cut into error blocks, each starting at a Python
traceback's exception line or at fatal native output ("Fatal Python error: Segmentation fault",
"terminate called after throwing an instance of ...", glibc's heap-corruption and assert() messages); the last block that is not a consequence of an
earlier one is the final error, and runs to the end of the tail. Consequences are skipped: augmenter
threads reporting "One or more background workers are no longer alive", a traceback cut off before its
exception line (the process aborted while printing it), one printed as "Exception ignored in" during
teardown, and the abort that follows an unhandled exception ("terminate called without an active
exception", "Fatal Python error: Aborted"). With no block at all the whole tail is the evidence
(argparse errors, "cannot execute").

The order of SIGNATURES matters: configuration errors first (restarting cannot help), then a full disk
(its errors can mention a checkpoint write), OOM kinds, torch.compile's own failures, then a checkpoint
that cannot be read. A trainer whose main thread died of nothing but "One or more background workers are
no longer alive" (`workers_died`: a worker was killed, typically for RAM or a full /dev/shm, and left no
error of its own) is WORKERS_DIED, or HOST_OOM when the cgroup counted an OOM kill.
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
    PREEMPTED = "preempted"            # SLURM: time limit near or preemption; stopped at a safe point, requeued
    DISK_FULL = "disk_full"            # ENOSPC/EDQUOT, typically torch.save under nnUNet_results
    COMPILE_ERROR = "compile_error"    # torch.compile (dynamo, inductor, Triton, no C compiler): restart without it
    WORKERS_DIED = "workers_died"      # only "background workers are no longer alive": RAM or /dev/shm, usually
    GPU_FAULT = "gpu_fault"            # NVML: uncorrectable ECC, pending page retirement, Xid: we stopped it
    TUNING = "tuning"                  # we stopped it to try (or take back) more augmentation workers


RESTARTABLE = frozenset({Reason.CRASH, Reason.CUDA_OOM, Reason.HOST_OOM, Reason.CORRUPT_CHECKPOINT,
                         Reason.HANG, Reason.GPU_LOST, Reason.COMPILE_ERROR, Reason.WORKERS_DIED})
# (reason, pattern) in priority order, matched against the final error of the stderr tail (`final_error`).
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
    # torch's shared-memory tensors (augmenter queues) live in /dev/shm, which is RAM: fewer workers help
    (Reason.HOST_OOM, re.compile(r"unable to write to file </torch_")),
] + [
    (Reason.DISK_FULL, re.compile(p)) for p in (
        r"No space left on device",
        r"\[Errno 28\]",
        r"Disk quota exceeded",
        # torch.save's zip writer after ENOSPC: the errno text is not always carried along
        r"PytorchStreamWriter failed writing file",
        r"unexpected pos \d+ vs \d+",
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
    # torch.compile (on by default since nnU-Net 2.4): after the OOM kinds, since inductor's autotuning
    # can run out of GPU memory too, and a smaller batch is the remedy for that
    (Reason.COMPILE_ERROR, re.compile(p)) for p in (
        r"torch\._(?:dynamo|inductor)\.exc\.\w+",   # BackendCompilerFailed, InductorError, Unsupported, ...
        r"\b(?:BackendCompilerFailed|InvalidCxxCompiler|CppCompileError)\b",
        r"\btriton\.(?:compiler|runtime)\.errors\.\w+",  # CompilationError, OutOfResources
        r"Failed to find C compiler",                   # Triton builds its launcher with the system's cc
        r"Python\.h: No such file or directory",        # ... and needs the Python headers for it
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
        # "failed reading zip archive: failed finding central directory" (truncated), "failed locating
        # file data/101" (half-written: the zip is intact but storages are missing), "failed reading file"
        r"PytorchStreamReader failed",
        r"failed finding central directory",
        r"_pickle\.UnpicklingError",
        r"invalid load key",
        r"Ran out of input",
        r"file in archive is not in a subdirectory",
    )
]

# Error messages name their cause in their first few hundred characters (a CUDA OOM line is ~600). The
# cap bounds patterns with two unbounded parts (FileNotFoundError ... .json, Assertion) on a hostile tail.
MAX_EVIDENCE_LINE = 4096


_TB = "Traceback (most recent call last):"
# Fatal native output that is an error of its own. "Fatal Python error: Aborted" is not: it is what
# faulthandler prints for the abort that follows an unhandled exception.
_FATAL = re.compile(r"(?:Fatal Python error: (?!Aborted\b)|terminate called after throwing an instance of "
                    # glibc's own last words before it aborts (heap corruption, a failed assert())
                    r"|double free or corruption|free\(\): invalid |malloc\(\): |corrupted size vs\. prev_size"
                    r"|\*\*\* stack smashing detected|\S+: [^\n]*: Assertion `[^'\n]{0,1000}' failed\.)")
# Exception lines that report an earlier failure rather than being one.
_CONSEQUENCE = re.compile(r"One or more background workers are no longer alive")
_NOT_AN_EXCEPTION = ("terminate called without an active exception", "Fatal Python error", _TB,
                     "Exception in thread", "Exception ignored in")


def final_error(text: str) -> str:
    """The final error of a stderr tail and everything after it (see the module docstring)."""
    lines = text.splitlines()
    start = thread_start = None
    for i, line in enumerate(lines):
        if _FATAL.match(line[:MAX_EVIDENCE_LINE]):
            start = i
        elif line.startswith(_TB):
            j = _exception_line(lines, i)
            if j is None or lines[j].startswith(_NOT_AN_EXCEPTION) or _CONSEQUENCE.search(lines[j]):
                continue  # cut off, or reporting an earlier failure
            if i > 0 and lines[i - 1].startswith("Exception ignored in"):
                continue  # teardown noise (a __del__ that failed), never why the process died
            if i > 0 and "Exception in thread" in lines[i - 1]:
                # a thread's uncaught exception does not end the process; after the main thread died, the
                # data-augmentation threads die of its consequences (Connection reset, workers gone)
                thread_start = j
                continue
            start = j
    start = start if start is not None else thread_start
    return text if start is None else "\n".join(lines[start:])


# How Python prints the last line of a traceback: a (dotted) exception class name, then ": message" or
# nothing. Interleaved output of dying threads can put other unindented text inside a traceback.
_EXC_LINE = re.compile(r"[A-Za-z_][\w.]*(?::|$)")


def _exception_line(lines: list[str], tb: int) -> int | None:
    """Index of the exception line that ends the traceback starting at `tb` (None: cut off)."""
    for k in range(tb + 1, len(lines)):
        line = lines[k]
        if line.startswith(_TB):
            return None  # another traceback began before this one ended: cut off
        if line and not line[0].isspace() and _EXC_LINE.match(line[:MAX_EVIDENCE_LINE]):
            return k
    return None


def workers_died(text: str) -> bool:
    """The main thread died of "One or more background workers are no longer alive" and nothing in the tail
    says why: no other error block (a worker that raised prints its own traceback first: that is the
    evidence then), only the workers' death and its consequences in other threads (connection resets)."""
    lines = text.splitlines()
    died = False
    for i, line in enumerate(lines):
        if _FATAL.match(line[:MAX_EVIDENCE_LINE]):
            return False
        if not line.startswith(_TB) or (i > 0 and ("Exception in thread" in lines[i - 1]
                                                   or lines[i - 1].startswith("Exception ignored in"))):
            continue
        j = _exception_line(lines, i)
        if j is None:
            continue
        if not _CONSEQUENCE.search(lines[j][:MAX_EVIDENCE_LINE]):
            return False  # an error of its own (the main thread's or a worker's)
        died = True
    return died


@dataclass(frozen=True)
class Exit:
    """What the supervisor knows about one ended attempt."""

    returncode: int | None          # Popen convention: -N for death by signal N
    stderr_tail: str = ""
    stop_intent: "Reason | None" = None  # why WE asked it to stop (the policy's stop reason)
    we_killed: bool = False         # we sent SIGKILL (stop escalation)
    final_checkpoint: bool = False  # checkpoint_final.pth exists after the exit
    oom_kills_delta: int | None = None  # cgroup memory.events oom_kill increase, None = unknown


def match_signature(text: str) -> Reason | None:
    text = "\n".join(line[:MAX_EVIDENCE_LINE] for line in text.splitlines())
    for reason, rx in SIGNATURES:
        if rx.search(text):
            return reason
    return None


def classify(x: Exit) -> Reason:
    if x.stop_intent is not None:
        return x.stop_intent
    if x.returncode == 0 and x.final_checkpoint:
        return Reason.COMPLETED
    found = match_signature(final_error(x.stderr_tail))
    if found is not None:
        return found
    if workers_died(x.stderr_tail):
        # a worker killed by the kernel's OOM killer is host RAM; without that evidence, /dev/shm or RAM
        # too, most often, but a restart may do (the policy lowers the workers when it repeats)
        return Reason.HOST_OOM if x.oom_kills_delta else Reason.WORKERS_DIED
    if x.returncode == -signal.SIGKILL and not x.we_killed:
        # The kernel OOM killer sends SIGKILL. When cgroup accounting says no OOM kill happened,
        # somebody else killed it: a crash, restartable all the same.
        return Reason.CRASH if x.oom_kills_delta == 0 else Reason.HOST_OOM
    return Reason.CRASH
