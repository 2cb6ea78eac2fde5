"""The queue master: one supervisor process per job (configuration x fold), one job per GPU slot.

How it works (gunicorn's arbiter: a small master, and workers that each carry every guarantee)
- core/queue_policy.py decides (which job starts on which slot, what a job's exit means, retries of a
  dead job supervisor, what a signal means); this module carries it out and reports what happened.
- daemon/queue_jobs.py knows the jobs on disk and as configs: what makes a queue impossible (`run` exits 2
  with all of it), and what each job's state.json says (the master reports it as events).
- Each job runs as `cardiacseg-train run --config PATH` in a child process with CARDIACSEG_QUEUE_JOB
  naming its configuration, fold, state directory (<state_dir>/jobs/<configuration>-fold_<f>) and GPU
  slot; `job_config(cfg)` applies it, so the child is an ordinary single-job supervisor: its own
  restarts, budget, OOM step-down (the plans file is shared by a configuration's folds: a step-down
  applies to the jobs after it and is recorded in that job's state), target, and a thermal guard on its
  own GPU (so a pause there pauses only that job).
- `QueueRunner` is the master's loop: signals only recorded (set_wakeup_fd); each turn reports the jobs
  that exited (with what their state.json says: outcome, unhealthy GPUs), the running jobs that got past
  data loading while others wait for it, the signals and a tick, and carries out the policy's actions
  (QNotice through [notify]); it keeps <state_dir>/queue.json (each job's status and what it waits for,
  the unhealthy GPUs and retired slots) and systemd's STATUS= current. A job already done (its state says
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
from supervisor.daemon import early_signals
from supervisor.daemon.queue_jobs import (ENV, job_line, read_state, read_sup, already_done, cascade_findings,  # noqa: F401
                                          concrete, data_group, npz_data, exited, job_config, job_configs,
                                          past_data_loading, problems, slot_gpus, start_problems, state_dir,
                                          still_running, version_problems)
from supervisor.integrations import proc, slurm
from supervisor.integrations.store import atomic_write

class QueueRunner:
    """The master's loop: signals only recorded (set_wakeup_fd); each turn reports exits, signals and a tick
    to queue_policy.decide_queue and carries out its actions (Launch, Forward, Log, QFinish); keeps
    <state_dir>/queue.json and systemd's STATUS= current."""

    def __init__(self, cfg, log, notify, mono=time.monotonic, quiet_trainer: bool = False, nnunetv2: str | None = None):
        self.cfg, self.log, self.notify, self.mono, self.quiet_trainer = cfg, log, notify, mono, quiet_trainer
        self.nnunetv2 = nnunetv2  # the trainer environment's (the stagger's condition)
        self.people = None  # [notify]'s Notifier for the queue's own notices (QNotice)
        self.loaded: set[str] = set()  # jobs reported past data loading
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
        from supervisor.integrations import notify as people
        self.people = people.build(self.cfg, self.log)
        self.loaded = {j.key for j in self.all if past_data_loading(read_state(self.cfg, j))}
        self.events.append(qp.QStart(tuple(j.key for j in self.all if j.key not in running and
                                           already_done(self.cfg, j)),
                                     tuple((k, slot) for k, (_pid, slot) in running.items()),
                                     self.nnunetv2, tuple((j.key, data_group(self.cfg, j)) for j in self.all),
                                     tuple(sorted(self.loaded)), slot_gpus(self.cfg, self.q.slots),
                                     npz_data(self.cfg, self.all)))
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
                    self.events.append(exited(self.cfg, self.by_key[key], code))
            for key in [k for k in self.adopted if still_running(self.cfg, self.by_key[k]) is None]:
                # not our child: its exit status is what it recorded (none: it died, as a crash)
                del self.adopted[key]
                j = self.by_key[key]
                self.events.append(exited(self.cfg, j, read_sup(self.cfg, j).get("exit_code")))
            self._watch_data_loading()
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
        if self.people is not None:
            self.people.close(timeout=5.0)  # the last notice (no healthy GPU left) goes out before exit, bounded
        return self.code

    def _watch_data_loading(self) -> None:
        """While jobs wait for a first job's data loading (the stagger), report the running jobs whose
        state.json shows a started epoch; nothing is read otherwise."""
        if not self.q.stagger or not set(self.q.group_of.values()) - self.q.loaded:
            return
        for key in self.q.slot_of:
            if key not in self.loaded and past_data_loading(read_state(self.cfg, self.by_key[key])):
                self.loaded.add(key)
                self.events.append(qp.JobPastDataLoading(key))

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
        elif isinstance(act, qp.QNotice):
            self.log.warning("queue_notice", kind=act.kind, message=act.fields.get("message"))
            if self.people is not None:
                self.people.publish(act, {"job": {"dataset": jobmod.dataset_name(self.cfg), "configuration": "queue",
                                                  "fold": act.fields.get("job", "all")}})
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
            line = job_line(self.cfg, self.by_key[key])
            parts.append(f"{key} {line}" if line else key)
        bad = "; unhealthy GPU " + ", ".join(str(g) for g in sorted(self.q.unhealthy)) if self.q.unhealthy else ""
        return f"{done}/{len(self.all)} done{bad}" + (": " + "; ".join(parts) if parts else "")

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
                          "gpu": self.q.slot_of.get(j.key), "state_dir": str(state_dir(self.cfg, j)),
                          "waits_for": self.q.why.get(j.key)}
                         for j in self.all],
                "stopping": self.q.state != qp.QState.RUNNING, "find_best_configuration": self.best,
                "unhealthy_gpus": {str(g): k for g, k in sorted(self.q.unhealthy.items())},
                "retired_slots": [s for s in self.q.bad_slots], "stagger": self.q.stagger,
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
