"""The supervisor's rules as pure functions of what was measured and the config in force.

policy.decide calls these; nothing here does I/O or reads a clock (the caller passes a monotonic `now`).
- `target_met`, `nonfinite`: an epoch record against [target];
- `hang_limit`, `hung`: the hang rule (no epoch for longer than the limit while the process tree, and
  the GPU where NVML tells, is idle);
- `backoff_delay`, `restarts_in_window`: the restart budget (OTP-style intensity);
- `thermal_verdict`: one temperature poll against [thermal] (hysteresis, stop, sensor loss, lost GPU);
- `next_batch_size`, `step_sequence`: the CUDA OOM step-down;
- `choose_resume`: which checkpoint `--c` resumes from, and which are moved aside;
- `trainer_overrides`: what the policy changed in the next trainer's environment (workers, compile, export);
- `space_needed`: the free space the next checkpoint save needs (check, the disk-full wait, the docs);
- `signal_meaning`: what a signal to the supervisor asks for, inside or outside a SLURM job;
- `slurm_job_ending`: whether SLURM already ends the job (a requeue would undo a user's scancel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from supervisor.core.training_log import EpochRecord, nanmean

# States in which a trainer runs (thermal_verdict works on State values as strings: no import cycle)
THERMAL_ACTIVE = ("running", "stop_pending", "paused")
REAP_LIMIT_S = 30.0   # after the trainer exits, how long its remnants may take to go before we go on anyway
DISK_CHECK_S = 30.0   # while the disk is full, how often it is measured


def nonfinite(rec: EpochRecord) -> bool:
    """A nan/inf train loss, or a pseudo Dice that is nan for every class. Missing values are unknown."""
    dice = nanmean(rec.dice) if rec.dice else None
    return any(v is not None and not math.isfinite(v) for v in (rec.train_loss, dice))


def target_met(rec: EpochRecord | None, cfg) -> bool:
    t = cfg.target
    if rec is None or t.ema_dice is None or math.isnan(rec.ema) or rec.ema < t.ema_dice:
        return False
    if t.min_class_dice is not None:
        # nan (class absent from the validation batches) does not count as reached
        return bool(rec.dice) and all(not math.isnan(d) and d >= t.min_class_dice for d in rec.dice)
    return True


def stop_time_left(s, now: float, cfg) -> float | None:
    """While a stop is underway, the longest it may still take, for systemd's EXTEND_TIMEOUT_USEC: the
    wait for the safe point (STOP_PENDING), the trainer's graceful exit (STOPPING), its remnants, and
    30 s of slack; None when nothing is being stopped."""
    state = s.state.value
    if state == "stop_pending":
        left = max(0.0, (s.safe_deadline or now) - now) + cfg.stop.timeout_seconds
    elif state == "stopping":
        left = max(0.0, (s.stop_deadline or now) - now)
    else:
        return None
    return left + REAP_LIMIT_S + 30


NNUNET_EXPORT_PROCS = 8  # nnunetv2.configuration.default_num_processes without nnUNet_def_n_proc


def trainer_overrides(s, cfg) -> dict[str, str]:
    """What the policy changed in the next trainer's environment: the augmentation workers (a host OOM, dead
    workers, a worker trial), torch.compile (off after a compile failure, while training.compile is auto),
    the export processes of the final validation (halved after a hang)."""
    out = {}
    if s.n_proc_da:
        out["nnUNet_n_proc_DA"] = str(s.n_proc_da)
    if s.compile_off and cfg.training.compile == "auto":
        out["nnUNet_compile"] = "f"
    if s.export_procs:
        out["nnUNet_def_n_proc"] = str(s.export_procs)
    return out


def fewer_export_procs(current: int | None, cfg) -> int:
    """nnUNet_def_n_proc for the --val rerun after a hung final validation: half of what hung (its
    export pool is where nnU-Net's validation deadlocks), at least 1."""
    if current is None:
        try:
            current = int(dict(cfg.environment).get("nnUNet_def_n_proc", NNUNET_EXPORT_PROCS))
        except ValueError:
            current = NNUNET_EXPORT_PROCS
    return max(1, current // 2)


def hang_limit(epoch_times: tuple[float, ...], epochs_this_attempt: int, cfg) -> float:
    """Seconds without an epoch after which an idle trainer counts as hung."""
    h = cfg.hang
    if epochs_this_attempt == 0:
        return h.first_epoch_minutes * 60
    if h.timeout_minutes > 0:
        return h.timeout_minutes * 60
    times = sorted(t for t in epoch_times if t)
    median = times[len(times) // 2] if times else 0.0
    return max(h.min_timeout_minutes * 60, 3 * median)


def hung(quiet_s: float, limit_s: float, cpu_share: float | None, gpu_util: float | None, cfg) -> bool:
    """No epoch for longer than the limit, the tree idle (CPU) and, where known, the GPU idle too."""
    idle = cfg.hang.idle_cpu_percent
    if quiet_s <= limit_s or cpu_share is None or cpu_share * 100 >= idle:
        return False
    return gpu_util is None or gpu_util <= idle  # a busy GPU: slow, not hung


def backoff_delay(consecutive_failures: int, cfg) -> float:
    """Delay before the restart that follows the n-th consecutive failure (n >= 1)."""
    n = max(consecutive_failures - 1, 0)
    r = cfg.restart
    return min(r.backoff_max_seconds, r.backoff_seconds * (2 ** min(n, 30)))


def restarts_in_window(times: tuple[float, ...], now: float, cfg) -> tuple[float, ...]:
    horizon = now - cfg.restart.window_minutes * 60
    return tuple(t for t in times if t > horizon)


def thermal_verdict(state: str, temps: dict, lost: bool, now: float, cfg, paused_at: float | None,
                    failed_reads: int) -> str | None:
    """What one poll means: "pause", "resume", "stop_hot", "stop_pause", "stop_sensor", "gpu_lost",
    "cooled" (after a thermal stop, every GPU known and cool again), or None. Unknown readings never
    resume or restart anything."""
    th = cfg.thermal
    known = [c for c in temps.values() if c is not None]
    complete = bool(temps) and len(known) == len(temps)
    if lost and state in THERMAL_ACTIVE:
        return "gpu_lost"
    if state == "cooling":
        return "cooled" if complete and max(known) <= th.resume_celsius else None
    if state not in THERMAL_ACTIVE:
        return None
    if known and max(known) >= th.stop_celsius:
        return "stop_hot"
    if failed_reads >= th.max_failed_reads:
        return "stop_sensor"
    if state == "paused":
        if complete and max(known) <= th.resume_celsius:
            return "resume"
        if paused_at is not None and now - paused_at > th.max_pause_minutes * 60:
            return "stop_pause"
        return None
    if known and max(known) > th.pause_celsius:
        # a multi-GPU run is never paused: NCCL would time out after 10 minutes
        return "stop_hot" if cfg.training.num_gpus > 1 else "pause"
    return None


def next_batch_size(bs: int, minimum: int, strategy: str, subtract: int, factor: float) -> int | None:
    """The batch size to try after a CUDA OOM at `bs`, or None when `bs` is already the minimum."""
    if bs <= minimum:
        return None
    if strategy == "multiply":
        new = math.floor(bs * factor)
        new = min(new, bs - 1)  # a factor close to 1 must still make progress
    else:
        new = bs - subtract
    return max(minimum, new)


def step_sequence(bs: int, minimum: int, strategy: str, subtract: int, factor: float) -> list[int]:
    """Every batch size the supervisor would try, starting from `bs` (for status and messages)."""
    out = [bs]
    while (n := next_batch_size(out[-1], minimum, strategy, subtract, factor)) is not None:
        out.append(n)
    return out


@dataclass(frozen=True)
class ResumeChoice:
    resume_from: str | None                 # what --c will load (nnU-Net's order, bad ones moved away)
    bad: tuple[tuple[str, str], ...] = ()   # (file, why) to move aside, in the order found
    had_any: bool = False                   # some checkpoint existed


def choose_resume(found, suspect: str | None) -> ResumeChoice:
    """`found`: ((name, problem or None), ...) in nnU-Net's resume order (final, latest, best; config/job.py's
    CHECKPOINT_ORDER). nnU-Net's --c loads the first file of that order that exists, so every unreadable
    file before the first good one is moved aside; `suspect` (the file the previous attempt died loading)
    counts as unreadable whatever verify said. Files after the chosen one are left alone."""
    bad = []
    for name, problem in found:
        why = "the previous attempt died loading it" if name == suspect else problem
        if why is None:
            return ResumeChoice(name, tuple(bad), True)
        bad.append((name, why))
    return ResumeChoice(None, tuple(bad), bool(found))


# At its fullest a fold holds checkpoint_latest, checkpoint_best and the launcher's temp copy of the one being
# saved (written beside the old file, then renamed; checkpoint_final replaces latest at the end). The margin
# covers the logs, the progress picture and the validation summary.
PEAK_CHECKPOINT_FILES = 3
SPACE_MARGIN_BYTES = 64 * 2**20


def space_needed(checkpoint_bytes: int, existing: int) -> int:
    """Free bytes the fold's disk needs from now on: the checkpoint files not there yet (at least the temp
    copy of the next save), each as large as the largest one, plus a margin. `check` (with an estimate when
    no checkpoint exists yet) and the disk-full wait both use it."""
    files = max(1, PEAK_CHECKPOINT_FILES - max(0, existing))
    return files * max(0, checkpoint_bytes) + SPACE_MARGIN_BYTES


def signal_meaning(signame: str, in_slurm: bool) -> str:
    """"stop", "preempt" (stop at a safe point, then requeue), "reload" or "ignore".

    Inside a SLURM job SIGUSR1 (`--signal=B:USR1@S`: the time limit is near) and SIGTERM (preemption, or
    scancel: SLURM's job state tells them apart before a requeue) ask for a requeue; SIGINT stays a stop.
    Outside SLURM SIGUSR1 means nothing to us, SIGTERM and SIGINT stop, SIGHUP re-reads the config."""
    if signame == "SIGHUP":
        return "reload"
    if in_slurm and signame in ("SIGTERM", "SIGUSR1"):
        return "preempt"
    return "stop" if signame in ("SIGTERM", "SIGINT") else "ignore"


# JobState values of a job SLURM is ending itself (scancel, its own preemption kill, a time limit run out).
# A signal for us to act on (--signal=B:USR1@S, `scancel --signal=...`) leaves it RUNNING.
SLURM_ENDING = frozenset({"COMPLETING", "CANCELLED", "COMPLETED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL"})


def slurm_job_ending(state: str | None) -> bool:
    return state in SLURM_ENDING
