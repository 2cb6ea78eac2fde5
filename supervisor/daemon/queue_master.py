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
from supervisor.daemon import early_signals
import psutil

from supervisor.integrations import proc, slurm
from supervisor.integrations.store import Lock, atomic_write

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


def job_configs(cfg) -> list[tuple[str, object]]:
    """(label, the job's config) for each job of a queue ("3d_fullres fold 1: "); [("", cfg)] for one job."""
    if not qp.is_queue(cfg):
        return [("", cfg)]
    return [(f"{j.configuration} fold {j.fold}: ", _with(cfg, j)) for j in jobs(cfg)]


def problems(cfg) -> list[str]:
    out = []
    gpus = [str(g) for g in cfg.queue.gpus]
    devices = [d.strip() for g in gpus for d in g.split(",")]  # a slot may be several GPUs ("0,1")
    if len(set(devices)) != len(devices):
        twice = sorted({d for d in devices if devices.count(d) > 1})
        out.append(f"queue.gpus: expected each GPU in one slot only, got {gpus} (GPU {', '.join(twice)} in "
                   "more than one): two jobs would train on one GPU")
    try:
        plans = json.loads(jobmod.plans_file(cfg).read_text())
        confs = plans["configurations"]
    except (OSError, ValueError, KeyError, TypeError):
        confs = None  # check/run name the plans problem itself
    if cfg.queue.folds:
        try:
            jobmod.expand_folds(cfg, list(cfg.queue.folds))
        except ValueError as e:
            out.append(f"queue.folds: {e}")
    all_jobs = jobs(cfg)
    for j in all_jobs:
        if confs is not None and j.configuration not in confs:
            out.append(f"queue.configurations: {j.configuration!r} is not in {jobmod.plans_file(cfg)} "
                       f"(has: {', '.join(confs)})")
        if j.configuration == "3d_cascade_fullres":
            low = Job("3d_lowres", j.fold)
            on_disk = (jobmod.fold_dir(_with(cfg, low)) / "checkpoint_final.pth").is_file()
            if low not in all_jobs and not on_disk:
                out.append(f"queue.configurations: 3d_cascade_fullres fold {j.fold} needs 3d_lowres fold {j.fold}: "
                           "add 3d_lowres to the queue or train it first")
    return sorted(set(out), key=out.index)


def concrete(cfg):
    """The queue as every command sees it: `all` in [queue] folds is every fold of splits_final.json, and a
    queue of one job is that job (trained, and shown, as [training] naming it would be). A fold the split
    lacks, or one given twice, is a ConfigError listing every problem of the queue at once."""
    from supervisor.config.loader import ConfigError

    q = cfg.queue
    if q.folds:
        try:
            folds = tuple(jobmod.expand_folds(cfg, list(q.folds)))
        except ValueError:
            raise ConfigError(cfg.path, problems(cfg)) from None
        cfg = cfg.replace(queue=dataclasses.replace(q, folds=folds))
    if (q.folds or q.configurations or q.gpus) and not qp.is_queue(cfg):
        env = dict(cfg.environment)
        if q.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(q.gpus[0])
        cfg = _with(cfg, jobs(cfg)[0]).replace(
            environment=env, queue=dataclasses.replace(cfg.queue, folds=(), configurations=(), gpus=()))
    return cfg


def _sup(cfg, j: Job) -> dict:
    """The job's durable record ("sup" of its state.json), {} when there is none or it is unreadable."""
    try:
        data = json.loads((state_dir(cfg, j) / "state.json").read_text())
        return data.get("sup") or {} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def already_done(cfg, j: Job) -> bool:
    return _sup(cfg, j).get("outcome") in qp.DONE_OUTCOMES


def still_running(cfg, j: Job) -> tuple[int, object] | None:
    """(pid, GPU slot) of this job's supervisor when one still runs (it holds the job's lock), e.g. after
    the master itself was killed; the slot is the one in its CARDIACSEG_QUEUE_JOB."""
    holder = Lock.holder(state_dir(cfg, j))
    if not holder or not holder.startswith("pid ") or not holder[4:].isdigit():
        return None
    pid = int(holder[4:])
    try:
        spec = json.loads(psutil.Process(pid).environ().get(ENV, "null")) or {}
    except (psutil.Error, OSError, ValueError):
        spec = {}
    return pid, spec.get("gpu")


class QueueRunner:
    """The master's loop: signals only recorded (set_wakeup_fd); each turn reports exits, signals and a tick
    to queue_policy.decide_queue and carries out its actions (Launch, Forward, Log, QFinish); keeps
    <state_dir>/queue.json and systemd's STATUS= current."""

    def __init__(self, cfg, log, notify, mono=time.monotonic, quiet_trainer: bool = False):
        self.cfg, self.log, self.notify, self.mono, self.quiet_trainer = cfg, log, notify, mono, quiet_trainer
        self.all = qp.jobs(cfg)
        self.by_key = {j.key: j for j in self.all}
        self.q = qp.Queue(order=tuple(self.all), slots=tuple(str(g) for g in cfg.queue.gpus) or (None,),
                          status={j.key: "pending" for j in self.all})
        self.procs: dict[str, subprocess.Popen] = {}
        self.adopted: dict[str, int] = {}  # key -> pid of a job supervisor an earlier master started
        self.finder: subprocess.Popen | None = None  # nnUNetv2_find_best_configuration
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
        self.sigs.extend(early_signals.take())  # arrived while `run` was starting
        sel.register(r, selectors.EVENT_READ)
        self.log.info("queue_started", jobs=[j.key for j in self.all], slots=list(self.q.slots))
        running = {j.key: found for j in self.all if (found := still_running(self.cfg, j)) is not None}
        self.adopted = {k: pid for k, (pid, _slot) in running.items()}
        self.events.append(qp.QStart(tuple(j.key for j in self.all if j.key not in running and
                                           already_done(self.cfg, j)),
                                     tuple((k, slot) for k, (_pid, slot) in running.items())))
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
                    proc.release(p)
                    self.events.append(qp.JobExited(key, code, already_done(self.cfg, self.by_key[key])))
            for key in [k for k in self.adopted if still_running(self.cfg, self.by_key[k]) is None]:
                # not our child: its exit status is what it recorded (none: it died, as a crash)
                del self.adopted[key]
                j = self.by_key[key]
                self.events.append(qp.JobExited(key, _sup(self.cfg, j).get("exit_code"), already_done(self.cfg, j)))
            if self.finder is not None and (code := self.finder.poll()) is not None:
                proc.release(self.finder)
                self.finder = None
                self.best["exit_code"] = code
                self.best["tail"] = _tail(Path(self.best["log"]))
                self.events.append(qp.FindBestExited(code))
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
            for pid in self.adopted.values():
                proc.send(pid, getattr(signal, act.signame))
        elif isinstance(act, qp.RunFindBest):
            self.find_best()
        elif isinstance(act, qp.StopFindBest):
            if self.finder is not None:
                self.finder.terminate()
                self.log.warning("find_best_configuration_stopped", why=act.why)
        elif isinstance(act, qp.QFinish):
            self.code = act.code
        else:  # pragma: no cover - a new action without an executor is a bug
            raise TypeError(f"unknown queue action {act!r}")

    def _launch(self, j, slot) -> None:
        spec = {"configuration": j.configuration, "fold": j.fold, "state_dir": str(state_dir(self.cfg, j)),
                "gpu": slot}
        env = {k: v for k, v in os.environ.items() if k not in jobmod.PRIVATE_ENV}
        env[ENV] = json.dumps(spec)
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(self.cfg.path),
                *(["--quiet-trainer"] if self.quiet_trainer else [])]
        # its own session: a terminal's Ctrl-C reaches the master only, which forwards it once
        self.procs[j.key] = proc.popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.log.info("queue_job_started", job=j.key, gpu=slot, state_dir=spec["state_dir"])

    def summary(self) -> str:
        done = sum(v == "done" for v in self.q.status.values())
        parts = []
        for key in self.q.slot_of:
            line = _job_line(self.cfg, self.by_key[key])
            parts.append(f"{key} {line}" if line else key)
        return f"{done}/{len(self.all)} done" + (": " + "; ".join(parts) if parts else "")

    def find_best(self) -> None:
        """Start nnUNetv2_find_best_configuration as a child the loop polls (watchdog pings and signals go on
        for the hours it may take); its exit is reported as FindBestExited."""
        done = [j for j in self.all if self.q.status[j.key] == "done"]
        confs = sorted({j.configuration for j in done})
        folds = sorted({str(j.fold) for j in done})
        t = self.cfg.training
        exe = jobmod.resolve_command(self.cfg.replace(training=dataclasses.replace(
            t, command=("nnUNetv2_find_best_configuration",))))[0]
        argv = [exe, jobmod.dataset_name(self.cfg), "-c", *confs, "-f", *folds, "-tr", t.trainer, "-p", t.plans]
        out = Path(self.cfg.paths.state_dir) / "find_best_configuration.log"
        self.best = {"argv": argv, "exit_code": None, "log": str(out), "tail": []}
        try:
            with open(out, "wb") as fh:
                self.finder = proc.popen(argv, env=jobmod.build_env(self.cfg), stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self.log.error("find_best_configuration_failed", error=str(e))
            self.events.append(qp.FindBestExited(None))
            return
        self.log.info("find_best_configuration_started", argv=" ".join(argv), log=str(out), pid=self.finder.pid)

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


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-12:]
    except OSError:
        return []


def _job_line(cfg, j: Job) -> str:
    try:
        return json.loads((state_dir(cfg, j) / "state.json").read_text()).get("status_line") or ""
    except (OSError, ValueError):
        return ""
