"""A queue of jobs (configuration x fold), one supervisor process per job, one job per GPU slot.

How it works (gunicorn's arbiter: a small master, and workers that each carry every guarantee)
- `jobs(cfg)` expands [queue] into Job(configuration, fold) entries; `problems(cfg)` lists what makes the
  queue impossible (a configuration or fold the plans/splits do not have, a GPU listed twice, a cascade
  without its 3d_lowres fold in the queue or on disk): `run` exits 2 with all of them.
- Each job runs as `cardiacseg-train run --config PATH` in a child process with CARDIACSEG_QUEUE_JOB
  naming its configuration, fold, state directory (<state_dir>/jobs/<configuration>-fold_<f>) and GPU
  slot; `job_config(cfg)` applies it, so the child is an ordinary single-job supervisor: its own
  restarts, budget, OOM step-down (the plans file is shared by a configuration's folds: a step-down
  applies to the jobs after it and is recorded in that job's state), target, and a thermal guard on its
  own GPU (so a pause there pauses only that job).
- `schedule(...)` is the queue's pure decision: which pending jobs start on which free slots (a cascade
  job only once its 3d_lowres fold is done). `outcome_of(exit code)` maps a child's exit status.
- `QueueRunner` is the master's loop: signals only recorded (set_wakeup_fd); each turn reaps children,
  asks `schedule`, starts jobs, forwards SIGHUP (reload) and SIGTERM (graceful stop) to every child, and
  keeps <state_dir>/queue.json and systemd's STATUS= current. A job already done (its state says
  target_reached/completed) is skipped when the service restarts. At the end, optionally,
  nnUNetv2_find_best_configuration runs over the configurations and folds that are done.
"""
from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import job as jobmod
from .events import ExitCode

ENV = "CARDIACSEG_QUEUE_JOB"
DONE = ("target_reached", "completed")
CHILD_RETRIES = 3  # a job whose supervisor process itself died is run again at most this often


@dataclass(frozen=True)
class Job:
    configuration: str
    fold: object

    @property
    def key(self) -> str:
        return f"{self.configuration}/{self.fold}"

    def state_dir(self, cfg) -> Path:
        return Path(cfg.paths.state_dir) / "jobs" / f"{self.configuration}-fold_{self.fold}"


def jobs(cfg) -> list[Job]:
    q = cfg.queue
    confs = list(q.configurations) or [cfg.training.configuration]
    folds = list(q.folds) or [cfg.training.fold]
    # configurations in the given order, cascade stages after their lowres stage
    confs.sort(key=lambda c: c == "3d_cascade_fullres")
    return [Job(c, f) for c in confs for f in folds]


def is_queue(cfg) -> bool:
    return len(jobs(cfg)) > 1 or len(cfg.queue.gpus) > 1


def job_config(cfg, spec: dict):
    """The single-job config a queue child runs with (from CARDIACSEG_QUEUE_JOB)."""
    env = dict(cfg.environment)
    if spec.get("gpu") is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(spec["gpu"])
    training = dataclasses.replace(cfg.training, configuration=spec["configuration"], fold=spec["fold"])
    paths = dataclasses.replace(cfg.paths, state_dir=Path(spec["state_dir"]))
    queue = dataclasses.replace(cfg.queue, folds=(), configurations=(), gpus=())
    return cfg.replace(training=training, paths=paths, environment=env, queue=queue)


def _with(cfg, j: Job):
    return cfg.replace(training=dataclasses.replace(cfg.training, configuration=j.configuration, fold=j.fold))


def problems(cfg) -> list[str]:
    out = []
    gpus = [str(g) for g in cfg.queue.gpus]
    if len(set(gpus)) != len(gpus):
        out.append(f"queue.gpus: expected each GPU once, got {gpus}")
    try:
        plans = json.loads(jobmod.plans_file(cfg).read_text())
        confs = plans["configurations"]
    except (OSError, ValueError, KeyError, TypeError):
        confs = None  # check/run name the plans problem itself
    splits = jobmod.plans_file(cfg).parent / "splits_final.json"
    try:
        n_splits = len(json.loads(splits.read_text()))
    except (OSError, ValueError, TypeError):
        n_splits = 5  # nnU-Net creates 5 folds when it draws the split
    all_jobs = jobs(cfg)
    for j in all_jobs:
        if confs is not None and j.configuration not in confs:
            out.append(f"queue.configurations: {j.configuration!r} is not in {jobmod.plans_file(cfg)} "
                       f"(has: {', '.join(confs)})")
        if j.fold != "all" and int(j.fold) >= n_splits:
            out.append(f"queue.folds: fold {j.fold} does not exist ({splits.name}: {n_splits} folds)")
        if j.configuration == "3d_cascade_fullres":
            low = Job("3d_lowres", j.fold)
            on_disk = (jobmod.fold_dir(_with(cfg, low)) / "checkpoint_final.pth").is_file()
            if low not in all_jobs and not on_disk:
                out.append(f"queue.configurations: 3d_cascade_fullres fold {j.fold} needs 3d_lowres fold {j.fold}: "
                           "add 3d_lowres to the queue or train it first")
    return sorted(set(out), key=out.index)


def outcome_of(code: int | None) -> str:
    return {ExitCode.OK: "done", ExitCode.GAVE_UP: "gave_up", ExitCode.CONFIG: "config_error"}.get(code, "failed")


def schedule(pending: list[Job], done: set[str], free_slots: list, stopping: bool,
             queued: set[str] | None = None) -> list[tuple[Job, object]]:
    """Pure: which pending jobs start now on which free slots (in queue order). A cascade fold starts only
    once its 3d_lowres fold is done, when that fold is part of the queue (`queued`: every job's key)."""
    if stopping:
        return []
    queued = {p.key for p in pending} if queued is None else queued
    out, slots = [], list(free_slots)
    for j in pending:
        if not slots:
            break
        low = Job("3d_lowres", j.fold).key
        if j.configuration == "3d_cascade_fullres" and low in queued and low not in done:
            continue  # its lowres stage is queued, running, or did not finish
        out.append((j, slots.pop(0)))
    return out


def already_done(cfg, j: Job) -> bool:
    try:
        data = json.loads((j.state_dir(cfg) / "state.json").read_text())
        return (data.get("sup") or {}).get("outcome") in DONE
    except (OSError, ValueError):
        return False


class QueueRunner:
    def __init__(self, cfg, log, notify):
        self.cfg, self.log, self.notify = cfg, log, notify
        self.all = jobs(cfg)
        self.status = {j.key: "pending" for j in self.all}
        self.codes: dict[str, int | None] = {}
        self.running: dict[str, tuple[subprocess.Popen, object]] = {}
        self.slots = [str(g) for g in cfg.queue.gpus] or [None]
        self.sigs: list[int] = []
        self.stopping = False
        self.best: dict | None = None
        self.retries: dict[str, int] = {}

    def run(self) -> int:
        sel, (r, w) = selectors.DefaultSelector(), socket.socketpair()
        for s in (r, w):
            s.setblocking(False)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(s, lambda n, _f: self.sigs.append(n))
        sel.register(r, selectors.EVENT_READ)
        for j in self.all:
            if already_done(self.cfg, j):
                self.status[j.key] = "done"
                self.log.info("queue_job_skipped", job=j.key, why="already done")
        self.log.info("queue_started", jobs=[j.key for j in self.all], slots=self.slots)
        self.notify.ready(self.summary())
        while True:
            self._signals()
            self._reap()
            self._start()
            self.save()
            self.notify.status(self.summary())
            self.notify.watchdog()
            if not self.running and (self.stopping or not self._pending()):
                break
            for _ in sel.select(1.0):
                try:
                    while r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
        if not self.stopping and self.cfg.queue.find_best_configuration:
            self.find_best()
        self.save()
        self.notify.stopping(self.summary())
        return self.exit_code()

    def _pending(self) -> list[Job]:
        return [j for j in self.all if self.status[j.key] == "pending"]

    def _signals(self) -> None:
        while self.sigs:
            s = self.sigs.pop(0)
            if s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self.stopping = True
                self.log.info("queue_stopping", signal=signal.Signals(s).name, running=list(self.running))
            if s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                for p, _slot in self.running.values():  # each job stops (or reloads) as a single job does
                    p.send_signal(s)

    def _reap(self) -> None:
        for key, (p, _slot) in list(self.running.items()):
            code = p.poll()
            if code is None:
                continue
            del self.running[key]
            self.codes[key] = code
            job = next(j for j in self.all if j.key == key)
            if code not in (ExitCode.OK, ExitCode.CONFIG, ExitCode.GAVE_UP, ExitCode.LOCKED) and not self.stopping \
                    and self.retries.get(key, 0) < CHILD_RETRIES:
                # the job's supervisor itself died (a bug, the OOM killer): its trainer may still run in its
                # own session. Run the job again on the same slot: the new supervisor stops that trainer
                # (by its marker) before it starts anything, and continues with --c.
                self.retries[key] = self.retries.get(key, 0) + 1
                self.log.error("queue_job_supervisor_died", job=key, exit_code=code, retry=self.retries[key])
                self._launch(job, _slot)
                continue
            self.status[key] = outcome_of(code)
            if self.status[key] == "done" and not already_done(self.cfg, job):
                self.status[key] = "stopped"  # exit 0 without a finished training: stopped or preempted
            level = "info" if self.status[key] == "done" else "error"
            getattr(self.log, level)("queue_job_ended", job=key, exit_code=code, outcome=self.status[key])
            if self.status[key] == "config_error" or (self.status[key] != "done" and
                                                      self.cfg.queue.on_give_up == "stop"):
                self.stopping = True
                for other, _s in self.running.values():
                    other.send_signal(signal.SIGTERM)

    def _start(self) -> None:
        busy = {slot for _p, slot in self.running.values()}
        free = [s for s in self.slots if s not in busy]
        done = {k for k, v in self.status.items() if v == "done"}
        for j, slot in schedule(self._pending(), done, free, self.stopping, {j.key for j in self.all}):
            self._launch(j, slot)

    def _launch(self, j: Job, slot) -> None:
        spec = {"configuration": j.configuration, "fold": j.fold, "state_dir": str(j.state_dir(self.cfg)),
                "gpu": slot}
        env = {k: v for k, v in os.environ.items() if k not in jobmod.PRIVATE_ENV}
        env[ENV] = json.dumps(spec)
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(self.cfg.path)]
        # its own session: a terminal's Ctrl-C reaches the master only, which forwards it once
        self.running[j.key] = (subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True),
                               slot)
        self.status[j.key] = "running"
        self.log.info("queue_job_started", job=j.key, gpu=slot, state_dir=spec["state_dir"])

    def exit_code(self) -> int:
        st = set(self.status.values())
        if "config_error" in st:
            return ExitCode.CONFIG
        if st & {"gave_up", "failed"}:
            return ExitCode.GAVE_UP
        return ExitCode.OK

    def summary(self) -> str:
        done = sum(v == "done" for v in self.status.values())
        parts = []
        for key in self.running:
            line = _job_line(self.cfg, next(j for j in self.all if j.key == key))
            parts.append(f"{key} {line}" if line else key)
        return f"{done}/{len(self.all)} done" + (": " + "; ".join(parts) if parts else "")

    def find_best(self) -> None:
        done = [j for j in self.all if self.status[j.key] == "done"]
        confs = sorted({j.configuration for j in done})
        folds = sorted({str(j.fold) for j in done})
        t = self.cfg.training
        exe = jobmod.resolve_command(self.cfg.replace(training=dataclasses.replace(
            t, command=("nnUNetv2_find_best_configuration",))))[0]
        argv = [exe, jobmod.dataset_name(self.cfg), "-c", *confs, "-f", *folds, "-tr", t.trainer, "-p", t.plans]
        out = Path(self.cfg.paths.state_dir) / "find_best_configuration.log"
        self.log.info("find_best_configuration_started", argv=" ".join(argv), log=str(out))
        try:
            with open(out, "wb") as fh:
                r = subprocess.run(argv, env=jobmod.build_env(self.cfg), stdout=fh, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=6 * 3600)
            code = r.returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            code = None
            self.log.error("find_best_configuration_failed", error=str(e))
        tail = out.read_text(errors="replace").strip().splitlines()[-12:] if out.exists() else []
        self.best = {"argv": argv, "exit_code": code, "log": str(out), "tail": tail}
        (self.log.info if code == 0 else self.log.error)("find_best_configuration_finished", exit_code=code)

    def save(self) -> None:
        from .store import atomic_write
        data = {"jobs": [{"configuration": j.configuration, "fold": j.fold, "key": j.key,
                          "status": self.status[j.key], "exit_code": self.codes.get(j.key),
                          "gpu": self.running[j.key][1] if j.key in self.running else None,
                          "state_dir": str(j.state_dir(self.cfg))} for j in self.all],
                "stopping": self.stopping, "find_best_configuration": self.best, "updated_at": time.time()}
        try:
            atomic_write(Path(self.cfg.paths.state_dir) / "queue.json", json.dumps(data, indent=1).encode())
        except OSError as e:
            self.log.warning("queue_state_not_saved", error=str(e))


def _job_line(cfg, j: Job) -> str:
    try:
        return json.loads((j.state_dir(cfg) / "state.json").read_text()).get("status_line") or ""
    except (OSError, ValueError):
        return ""
