"""Remedies for the failures nnU-Net users hit most: what follows an attempt that ended for a known cause
a plain restart cannot fix, and what a GPU's hardware errors mean.

Each function is pure, like every rule: (sup, ..., monotonic now, config in force) -> (sup', actions), and
moves the job only through transition.py. rules_attempt._after calls `remedy()` first; no actions mean "no
remedy applies: restart or give up as for any crash".

- torch.compile failed (Reason.COMPILE_ERROR: inductor, dynamo, Triton, no C compiler; nnU-Net compiles
  by default since 2.4): restart at once with nnUNet_compile=f for the rest of the job (Sup.compile_off,
  SetCompile records it where `status` shows it), not counted against the crash budget, once: with
  compile already off, or forced by training.compile = "on", it is a crash like any other (the budget
  bounds it), so a run never loops with compile on.
- Augmentation workers died and nothing else (Reason.WORKERS_DIED): usually host RAM or a small /dev/shm
  (Docker's 64 MB). The first time a counted restart, as nnU-Net's maintainers advise; when it repeats,
  halve nnUNet_n_proc_DA (not counted), down to 1: the halvings are this remedy's own budget. Host OOM
  (a worker or the trainer taken by the OOM killer) halves at once.
- Hardware errors (GpuFaults, from NVML): the GPU is marked unhealthy (Sup.gpu_faults, state.json's
  unhealthy_gpus for the queue), a running attempt stops at its safe point and the job ends FAILED
  (outcome gpu_unhealthy, exit 3): it is never restarted on that GPU.
- Divergence from the first epochs (no finite epoch before the streak) is bad data far more often than a
  bad learning rate: its final message says so (the job is never restarted into it, whatever the budget).
"""
from __future__ import annotations

import dataclasses
import signal

from supervisor.core import rules_tune
from supervisor.core.actions import Log, SetCompile, SetWorkers, SignalGroup
from supervisor.core.classify import Reason
from supervisor.core.events import GpuFaults
from supervisor.core.exit_codes import ExitCode
from supervisor.core.record import State, Sup
from supervisor.core.transition import finish, request_stop, resumed, transition

# a streak that starts at or before this epoch diverged "from the first epochs": the data, usually
EARLY_EPOCHS = 2

# what a person can do when the job gives up after restarts of this kind (appended to the gave_up message)
ADVICE = {
    Reason.WORKERS_DIED: "augmentation workers kept dying with nnUNet_n_proc_DA at 1: check free RAM (free -g) "
                         "and /dev/shm (df -h /dev/shm; in Docker --shm-size=8g or --ipc=host); "
                         "`cardiacseg-train check` measures both",
    Reason.COMPILE_ERROR: "torch.compile kept failing: set training.compile = \"off\" (or \"auto\", which turns "
                          "it off after the first failure)",
    Reason.HOST_OOM: "host RAM ran out: fewer augmentation workers (nnUNet_n_proc_DA), fewer jobs on this "
                     "machine, or more RAM",
}


def remedy(s: Sup, reason: Reason, now, cfg, said: str):
    """(sup', actions) when a remedy applies to an attempt that ended for `reason`, else (sup', None): no
    remedy, restart or give up as for any crash (sup' may count what the remedy watches for). Called once
    the outcomes that end the job anyway (done, diverged, a configuration error, preempted) are out of the
    way."""
    if s.gpu_faults:
        return unhealthy(s)  # whatever ended the attempt, it is not restarted on a GPU with hardware errors
    if reason == Reason.TUNING:
        return rules_tune.restart(s, now, cfg)
    if reason == Reason.COMPILE_ERROR and cfg.training.compile == "auto" and not s.compile_off:
        return _compile_off(s, now, cfg, said)
    if reason == Reason.HOST_OOM and (s.n_proc_da or 1) > 1:
        return _fewer_workers(s, reason, now, cfg)
    if reason == Reason.WORKERS_DIED:
        s = dataclasses.replace(s, workers_died=s.workers_died + 1)
        if s.workers_died >= 2 and (s.n_proc_da or 1) > 1:
            return _fewer_workers(s, reason, now, cfg)
        return s, None  # the first time: a plain (counted) restart
    return s, None


def _compile_off(s: Sup, now, cfg, said: str):
    delay = cfg.restart.backoff_seconds
    why = said or "torch.compile failed"
    s, ch = transition(s, State.BACKOFF, Reason.COMPILE_ERROR,
                       {"delay_s": delay, "counted": False, "restart": s.restarts + 1, "nnUNet_compile": "f",
                        "error": why},
                       compile_off=True, restart_counts=False, restart_at=now + delay)
    return s, [ch, SetCompile(why),
               Log("compile_turned_off", "warning",
                   {"error": why, "variable": "nnUNet_compile", "new": "f",
                    "revert": 'training.compile = "on" in config.toml'}),
               Log("restart_scheduled", "warning", {"reason": Reason.COMPILE_ERROR.value, "delay_s": delay,
                                                    "counted": False})]


def _fewer_workers(s: Sup, reason: Reason, now, cfg):
    old = s.n_proc_da or 1
    new = max(1, old // 2)
    delay = cfg.restart.backoff_seconds
    s, ch = transition(s, State.BACKOFF, reason, {"delay_s": delay, "counted": False, "workers": [old, new],
                                                  "restart": s.restarts + 1},
                       n_proc_da=new, workers_died=0, restart_counts=False, restart_at=now + delay)
    return s, [ch, SetWorkers(old, new),
               Log("workers_reduced", "warning", {"variable": "nnUNet_n_proc_DA", "old": old, "new": new,
                                                  "reason": reason.value}),
               Log("restart_scheduled", "warning", {"reason": reason.value, "delay_s": delay, "counted": False})]


def diverged_message(s: Sup) -> str:
    early = s.diverged_from is not None and s.diverged_from <= EARLY_EPOCHS
    head = (f"training diverged: non-finite loss or pseudo Dice for {s.nonfinite_streak} epochs in a row"
            + (f" from epoch {s.diverged_from}" if s.diverged_from is not None else "") + ". ")
    if early:
        return head + ("From the first epochs this is nearly always the data, not the training: check the data "
                       "(nnUNetv2_plan_and_preprocess -d DATASET --verify_dataset_integrity; images with NaN or "
                       "inf, labels outside dataset.json's), preprocess again, then start again. Not restarted.")
    return head + ("Not restarted into the same divergence: check the data and the learning rate, move the bad "
                   "checkpoints aside, then start again.")


# ---- GPU hardware errors ----------------------------------------------------------------------------------
def unhealthy(s: Sup):
    """The attempt stopped for a GPU's hardware errors has ended: FAILED, never restarted on that GPU."""
    gpus = ", ".join(f"GPU {g}: {what}" for g, what in sorted(s.gpu_faults.items()))
    return finish(s, State.FAILED, "gpu_unhealthy", ExitCode.GAVE_UP,
                  f"hardware errors on the GPU ({gpus or 'reported by NVML'}): stopped at a safe point and not "
                  "restarted on it. See `nvidia-smi -q -d ECC,PAGE_RETIREMENT,ROW_REMAPPER` and the kernel log "
                  "(Xid); pending retirements clear after a GPU reset or reboot. Then start again (training "
                  "resumes with --c), or on a healthy GPU (CUDA_VISIBLE_DEVICES).", "error")


def on_gpu_faults(s: Sup, ev: GpuFaults, now, cfg):
    """hardware errors -> GPU unhealthy: stop at the safe point (FAILED once stopped; at once when waiting)"""
    new = {g: what for g, what in ev.faults if s.gpu_faults.get(g) != what}
    if not new:
        return s, []
    s = dataclasses.replace(s, gpu_faults={**s.gpu_faults, **new})
    log = Log("gpu_fault", "error", {"gpus": dict(new)})
    if s.state in (State.RUNNING, State.PAUSED):
        cont = [SignalGroup(signal.SIGCONT)] if s.state == State.PAUSED else []
        s = resumed(s, now) if s.state == State.PAUSED else s
        why = "hardware errors on GPU " + ", ".join(sorted(new))
        s, acts = request_stop(s, Reason.GPU_FAULT, now, cfg, why, cfg.stop.checkpoint_wait_seconds)
        return s, [log, *cont, *acts]
    if s.state in (State.IDLE, State.BACKOFF, State.COOLING, State.NO_SPACE):
        s, acts = unhealthy(s)
        return s, [log, *acts]
    # STOP_PENDING / STOPPING / REQUEUING: a stop is already under way; the GPU stays marked unhealthy
    return s, [log]
