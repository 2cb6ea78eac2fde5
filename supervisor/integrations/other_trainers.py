"""Other trainers on the same fold: find them (check, status, run) and take over from one (--take-over).

How it works
- `find(cfg)` scans the process table (psutil) for a process whose argv is an nnU-Net training command
  for this job: a program named like nnUNetv2_train / cardiacseg-train-nnunet / a python script running
  nnunetv2's run_training, followed by the positional DATASET CONFIGURATION FOLD of this job (the dataset
  by name or number, as nnU-Net accepts it), with the same trainer and plans (`-tr`, `-p`, defaults as
  nnU-Net's). Where its environment is readable, its nnUNet_results must be ours. Processes started by a
  supervisor of THIS state directory carry the attempt marker (proc.ATTEMPT_ENV) and are not "others":
  they are our own leftovers, which the daemon stops itself. Forked workers of a trainer share its argv:
  only the topmost matching process of a tree is reported.
- `take_over(cfg, found, log)` stops such a trainer at its next safe point, the way the supervisor stops
  its own: it follows the fold's training log and sends SIGINT to the trainer's process group right after
  the next "Epoch N" / "Training done." line (written after the checkpoint saves), or after
  stop.checkpoint_wait_seconds at the latest; SIGKILL after stop.timeout_seconds. Then `run` continues
  with --c from the checkpoint it left.
"""
from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.config import job
from supervisor.integrations import proc
from supervisor.core.training_log import parse_line
from supervisor.integrations.log_follower import LogFollower

PROGRAMS = re.compile(r"(?:^|/)(?:nnUNetv2_train|cardiacseg-train-nnunet|run_training(?:\.py)?)$")


@dataclass(frozen=True)
class Other:
    pid: int
    command: str


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
    ours = f"{Path(cfg.paths.state_dir).resolve()}#"
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
            if env.get(proc.ATTEMPT_ENV, "").startswith(ours):
                continue
            theirs = env.get("nnUNet_results")
            if theirs and str(Path(theirs).resolve()) != results:
                continue
            hits[p.pid] = Other(p.pid, " ".join(argv))
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


def describe(found: list[Other]) -> str:
    return "; ".join(f"pid {o.pid}: {o.command}" for o in found)


def take_over(cfg, found: list[Other], log) -> None:
    """Stop the other trainers at their next safe point (bounded), then return."""
    follower = LogFollower(job.fold_dir(cfg))
    for _ in follower.drain():  # only lines written from now on count
        pass
    deadline = time.monotonic() + cfg.stop.checkpoint_wait_seconds
    log.warning("take_over_waiting_for_safe_point", pids=[o.pid for o in found],
                wait_s=cfg.stop.checkpoint_wait_seconds)
    safe = False
    while not safe and time.monotonic() < deadline and any(psutil.pid_exists(o.pid) for o in found):
        for _name, line in follower.poll():
            ev = parse_line(line)
            if ev is not None and ev[0] in ("epoch", "done"):
                safe = True
        time.sleep(0.2)
    groups = set()
    for o in found:
        try:
            groups.add(os.getpgid(o.pid))
        except OSError:
            continue
    groups.discard(os.getpgrp())  # started with `&` from our own shell script: never signal ourselves
    for o in found:               # ... such a trainer is stopped by its pid and its children
        try:
            if os.getpgid(o.pid) == os.getpgrp():
                for p in [o.pid, *proc.descendants(o.pid)]:
                    os.kill(p, signal.SIGINT)
        except OSError:
            continue
    for g in groups:
        proc.signal_group(g, signal.SIGINT)
        proc.signal_group(g, signal.SIGCONT)
    log.warning("take_over_stopping", pids=[o.pid for o in found], safe_point=safe)
    end = time.monotonic() + cfg.stop.timeout_seconds
    while time.monotonic() < end and any(proc.group_alive(g) for g in groups):
        time.sleep(0.2)
    for g in groups:
        proc.signal_group(g, signal.SIGKILL)
    end = time.monotonic() + 10
    while time.monotonic() < end and any(proc.group_alive(g) for g in groups):
        time.sleep(0.1)
