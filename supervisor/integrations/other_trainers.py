"""Other trainers on the same fold: find them (check, status, run) and take over from one (--take-over).

How it works
- `find(cfg)` scans the process table (psutil) for a process whose argv is an nnU-Net training command
  for this job: a program named like nnUNetv2_train / cardiacseg-train-nnunet / a python script running
  nnunetv2's run_training, followed by the positional DATASET CONFIGURATION FOLD of this job (the dataset
  by name or number, as nnU-Net accepts it), with the same trainer and plans (`-tr`, `-p`, defaults as
  nnU-Net's). Where its environment is readable, its nnUNet_results must be ours. Processes started by a
  supervisor of THIS state directory carry the attempt marker (proc.ATTEMPT_ENV) and are not "others":
  they are our own leftovers, which the daemon stops itself. A marker of ANOTHER state directory whose
  lock is held names the supervisor running that trainer (`Other.supervisor`): taking over from it would
  start a fight, so the policy refuses. Forked workers of a trainer share its argv: only the topmost
  matching process of a tree is reported. A trainer this process may not signal (another user's, seen from
  a service without CAP_KILL) carries its user's name (`Other.owner`): --take-over could not stop it, so
  the policy refuses it too. Seeing other users' processes needs /proc without hidepid (the unit's
  ProtectProc=default).
- Whether such a trainer is refused or taken over is the policy's decision (Start.others): `run
  --take-over` adopts it as the current attempt and stops it at its next safe point through the one
  STOP_PENDING path, then continues with --c.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.config import job
from supervisor.integrations import proc
from supervisor.integrations.store import Lock

PROGRAMS = re.compile(r"(?:^|/)(?:nnUNetv2_train|cardiacseg-train-nnunet|run_training(?:\.py)?)$")


@dataclass(frozen=True)
class Other:
    pid: int
    command: str
    supervisor: str = ""  # "pid N, state directory D": the live supervisor that started it, if any
    owner: str = ""       # the user it runs as, when this process may not signal it ("" when it may)


def _supervisor(marker: str) -> str:
    """The live supervisor whose attempt marker this is ("" for none: a hand-started trainer, or one whose
    supervisor is gone)."""
    state_dir = marker.rpartition("#")[0]
    holder = Lock.holder(Path(state_dir)) if state_dir else None
    return f"{holder}, state directory {state_dir}" if holder else ""


def _matches(argv: list[str], cfg, dataset: str) -> bool:
    start = next((i for i, a in enumerate(argv[:3]) if PROGRAMS.search(a)), None)
    if start is None:
        return False
    pos, opts, i = [], {"-tr": "nnUNetTrainer", "-p": "nnUNetPlans"}, start + 1
    while i < len(argv):
        a = argv[i]
        if a in opts and i + 1 < len(argv):
            opts[a] = argv[i + 1]
            i += 2
            continue
        if a.startswith("-"):
            i += 2 if a in ("-device", "-num_gpus", "-pretrained_weights") else 1
            continue
        pos.append(a)
        i += 1
    if len(pos) < 3:
        return False
    ds_ok = pos[0] == dataset or (pos[0].isdigit() and dataset.startswith(f"Dataset{int(pos[0]):03d}_"))
    t = cfg.training
    return (ds_ok and pos[1] == t.configuration and pos[2] == str(t.fold) and opts["-tr"] == t.trainer
            and opts["-p"] == t.plans)


def find(cfg) -> list[Other]:
    dataset, results = job.dataset_name(cfg), str(Path(cfg.paths.results).resolve())
    # no state directory (unpack asking about an archive's job): no trainer is ours, every one counts
    ours = f"{Path(cfg.paths.state_dir).resolve()}#" if cfg.paths.state_dir is not None else None
    hits: dict[int, Other] = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            argv = p.info["cmdline"] or []
            if p.pid == os.getpid() or not _matches(argv, cfg, dataset):
                continue
            try:
                env = p.environ()
            except (psutil.AccessDenied, OSError):
                env = {}
            marker = env.get(proc.ATTEMPT_ENV, "")
            if ours is not None and marker.startswith(ours):
                continue
            theirs = env.get("nnUNet_results")
            if theirs and str(Path(theirs).resolve()) != results:
                continue
            hits[p.pid] = Other(p.pid, " ".join(argv), _supervisor(marker), _owner_out_of_reach(p))
        except psutil.Error:
            continue
    # forked augmentation workers share the trainer's argv: report the top of each tree only
    top = []
    for pid, o in hits.items():
        try:
            if not any(a.pid in hits for a in psutil.Process(pid).parents()):
                top.append(o)
        except psutil.Error:
            continue
    return sorted(top, key=lambda o: o.pid)


def _owner_out_of_reach(p: psutil.Process) -> str:
    """The user `p` runs as when this process may not signal it (kill(pid, 0): EPERM), else ""."""
    try:
        os.kill(p.pid, 0)
        return ""
    except PermissionError:
        try:
            return p.username()
        except psutil.Error:
            return "another user"
    except OSError:
        return ""


def describe(found: list[Other]) -> str:
    return "; ".join(f"pid {o.pid}{f' (user {o.owner})' if o.owner else ''}: {o.command}" for o in found)


def as_event(found: list[Other]) -> tuple:
    """Start.others: ((pid, command, supervisor, owner), ...), what the policy decides on."""
    return tuple((o.pid, o.command, o.supervisor, o.owner) for o in found)
