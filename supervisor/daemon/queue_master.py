"""The queue master: one supervisor process per job (configuration x fold), one job per GPU slot.

How it works (gunicorn's arbiter: a small master, and workers that each carry every guarantee)
- core/queue_policy.py decides (which job starts on which slot, what a job's exit means, retries of a
  dead job supervisor, what a signal means); this module carries it out and reports what happened.
- `problems(cfg)` lists what makes the queue impossible (a configuration or fold the plans/splits do not
  have, a GPU listed twice, a cascade without its 3d_lowres fold in the queue or on disk): `run` exits 2
  with all of them.
- Each job runs as `cardiacseg-train run --config PATH` in a child process with CARDIACSEG_QUEUE_JOB
  naming its configuration, fold, state directory (<state_dir>/jobs/<configuration>-fold_<f>) and GPU
  slot; `job_config(cfg)` applies it, so the child is an ordinary single-job supervisor: its own
  restarts, budget, OOM step-down (the plans file is shared by a configuration's folds: a step-down
  applies to the jobs after it and is recorded in that job's state), target, and a thermal guard on its
  own GPU (so a pause there pauses only that job).
- `QueueRunner` is the master's loop: signals only recorded (set_wakeup_fd); each turn reports the jobs
  that exited, the signals and a tick, and carries out the policy's actions; it keeps
  <state_dir>/queue.json and systemd's STATUS= current. A job already done (its state says
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
from pathlib import Path

from supervisor.config import job as jobmod
from supervisor.core import queue_policy as qp
from supervisor.core.actions import Log
from supervisor.core.queue_policy import Job, jobs
from supervisor.integrations import slurm
from supervisor.integrations.store import atomic_write

ENV = "CARDIACSEG_QUEUE_JOB"


def state_dir(cfg, j: Job) -> Path:
    """Each job's own state directory below the queue's."""
    return Path(cfg.paths.state_dir) / "jobs" / f"{j.configuration}-fold_{j.fold}"


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


def already_done(cfg, j: Job) -> bool:
    try:
        data = json.loads((state_dir(cfg, j) / "state.json").read_text())
        return (data.get("sup") or {}).get("outcome") in qp.DONE_OUTCOMES
    except (OSError, ValueError):
        return False


class QueueRunner:
    """The master's loop: signals only recorded (set_wakeup_fd); each turn reports exits, signals and a tick
    to queue_policy.decide_queue and carries out its actions (Launch, Forward, Log, QFinish); keeps
    <state_dir>/queue.json and systemd's STATUS= current."""

    def __init__(self, cfg, log, notify, mono=time.monotonic):
        self.cfg, self.log, self.notify, self.mono = cfg, log, notify, mono
        self.all = qp.jobs(cfg)
        self.by_key = {j.key: j for j in self.all}
        self.q = qp.Queue(order=tuple(self.all), slots=tuple(str(g) for g in cfg.queue.gpus) or (None,),
                          status={j.key: "pending" for j in self.all})
        self.procs: dict[str, subprocess.Popen] = {}
        self.sigs: list[int] = []
        self.events: list = []
        self.best: dict | None = None
        self.code: int | None = None

    def run(self) -> int:
        sel, (r, w) = selectors.DefaultSelector(), socket.socketpair()
        for s in (r, w):
            s.setblocking(False)
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(s, lambda n, _f: self.sigs.append(n))
        sel.register(r, selectors.EVENT_READ)
        self.log.info("queue_started", jobs=[j.key for j in self.all], slots=list(self.q.slots))
        self.events.append(qp.QStart(tuple(j.key for j in self.all if already_done(self.cfg, j))))
        self.pump()
        self.notify.ready(self.summary())
        while self.code is None:
            for _ in sel.select(1.0):
                try:
                    while r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            while self.sigs:
                n = self.sigs.pop(0)
                if n != signal.SIGCHLD:
                    self.events.append(qp.QSignalled(signal.Signals(n).name, slurm.in_job()))
            for key, p in list(self.procs.items()):
                if (code := p.poll()) is not None:
                    del self.procs[key]
                    self.events.append(qp.JobExited(key, code, already_done(self.cfg, self.by_key[key])))
            self.events.append(qp.QTick())
            self.pump()
            self.notify.status(self.summary())
            self.notify.watchdog()
        self.save()
        self.notify.stopping(self.summary())
        return self.code

    def pump(self) -> None:
        while self.events:
            self.q, actions = qp.decide_queue(self.q, self.events.pop(0), self.mono(), self.cfg)
            for act in actions:
                self.execute(act)
        self.save()

    def execute(self, act) -> None:
        if isinstance(act, Log):
            getattr(self.log, act.level)(act.event, **act.fields)
        elif isinstance(act, qp.Launch):
            self._launch(self.by_key[act.key], act.slot)
        elif isinstance(act, qp.Forward):
            for p in self.procs.values():  # each job stops (or reloads) as a single job does
                p.send_signal(getattr(signal, act.signame))
        elif isinstance(act, qp.QFinish):
            if act.find_best:
                self.find_best()
            self.code = act.code
        else:  # pragma: no cover - a new action without an executor is a bug
            raise TypeError(f"unknown queue action {act!r}")

    def _launch(self, j, slot) -> None:
        spec = {"configuration": j.configuration, "fold": j.fold, "state_dir": str(state_dir(self.cfg, j)),
                "gpu": slot}
        env = {k: v for k, v in os.environ.items() if k not in jobmod.PRIVATE_ENV}
        env[ENV] = json.dumps(spec)
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(self.cfg.path)]
        # its own session: a terminal's Ctrl-C reaches the master only, which forwards it once
        self.procs[j.key] = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.log.info("queue_job_started", job=j.key, gpu=slot, state_dir=spec["state_dir"])

    def summary(self) -> str:
        done = sum(v == "done" for v in self.q.status.values())
        parts = []
        for key in self.q.slot_of:
            line = _job_line(self.cfg, self.by_key[key])
            parts.append(f"{key} {line}" if line else key)
        return f"{done}/{len(self.all)} done" + (": " + "; ".join(parts) if parts else "")

    def find_best(self) -> None:
        done = [j for j in self.all if self.q.status[j.key] == "done"]
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
        data = {"jobs": [{"configuration": j.configuration, "fold": j.fold, "key": j.key,
                          "status": self.q.status[j.key], "exit_code": self.q.codes.get(j.key),
                          "gpu": self.q.slot_of.get(j.key), "state_dir": str(state_dir(self.cfg, j))}
                         for j in self.all],
                "stopping": self.q.state != qp.QState.RUNNING, "find_best_configuration": self.best,
                "updated_at": time.time()}
        try:
            atomic_write(Path(self.cfg.paths.state_dir) / "queue.json", json.dumps(data, indent=1).encode())
        except OSError as e:
            self.log.warning("queue_state_not_saved", error=str(e))


def _job_line(cfg, j: Job) -> str:
    try:
        return json.loads((state_dir(cfg, j) / "state.json").read_text()).get("status_line") or ""
    except (OSError, ValueError):
        return ""
