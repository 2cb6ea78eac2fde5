"""The main loop: turn what happened into events, queue them, ask policy.decide, carry out the actions.

How it works (after gunicorn's arbiter and torch.distributed.elastic's agent)
- Signal handlers only append the signal number to a queue; `signal.set_wakeup_fd` wakes the selector.
  SIGCHLD is handled too, so a trainer's death wakes the loop at once.
- One `selectors` loop waits on the trainer's stdout/stderr pipes and the wakeup socket, with a timeout
  that is the nearest of: the log poll (0.25 s), a policy deadline, or a quick re-check while an ended
  attempt's remnants are reaped.
- Each turn the adapters report what they measured into one FIFO queue: forwarded trainer output,
  signals (Signalled: what one means is the policy's), the trainer's exit (TrainerExited) and then what
  is left of its attempt (Remnants, until the policy collects the exit), log lines (EpochStarted,
  EpochDone, TrainingDone), an activity sample, a temperature poll, and a Tick. `pump()` hands them to
  `policy.decide` one at a time with a MONOTONIC `now`; the actions are carried out by executor.py, and
  an action whose result matters reports a follow-up event into the same queue: the dispatcher is never
  re-entered. Wall-clock time only goes into records shown to people (attempts, changes, updated_at).
- No decision is made here: not what a signal means, not how long to reap, not which checkpoint to
  resume from, not whether another trainer on the fold is refused or taken over.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
from collections import deque

from supervisor.config import job
from supervisor.config.loader import Config, ConfigError
from supervisor.core import criteria
from supervisor.core.events import (EpochDone, EpochStarted, Signalled, Start, Tick, TrainerExited, TrainingDone)
from supervisor.core.policy import decide
from supervisor.core.record import Sup
from supervisor.core.status_line import summary_line
from supervisor.core.training_log import EpochAssembler, History, parse_line, replay
from supervisor.daemon import early_signals
from supervisor.daemon.attempt import Attempt
from supervisor.daemon.executor import Executor
from supervisor.integrations import (cascade, checkpoints, environment, fit, gpu_health, log_setup, other_trainers,
                                    proc, slurm, thermal, trainer_class)
from supervisor.integrations.log_follower import LogFollower
from supervisor.integrations.nvml import Nvml
from supervisor.integrations.plans import startup_batch_size
from supervisor.integrations.publish import Sinks
from supervisor.integrations.sdnotify import Notifier
from supervisor.integrations.epoch_log import EpochLog
from supervisor.integrations.store import Lock, StateStore, move_aside, safe_mkdir

LOG_POLL_S = 0.25
REAP_POLL_S = 0.05
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)


class Daemon(Executor):
    def __init__(self, cfg: Config, mono=time.monotonic, wall=time.time, take_over: bool = False, shape=None):
        """`shape(cfg)`: what makes the file's config this job (a queue job's fold, GPU and state directory),
        applied to every reload too."""
        self.cfg, self.mono, self.wall, self.take_over = cfg, mono, wall, take_over
        self.shape = shape or (lambda c: c)
        self.log = log_setup.get()
        self.store = StateStore(cfg.paths.state_dir)
        self.lock = Lock(cfg.paths.state_dir)
        self.sup = Sup()
        self.attempts: list[dict] = []
        self.changes: list[dict] = []
        self.history = History()
        self.follower = LogFollower(job.fold_dir(cfg))
        self.assembler = EpochAssembler()
        self.child: Attempt | None = None
        self.sel = selectors.DefaultSelector()
        self.sig_queue: deque[int] = deque()
        self.events: deque = deque()
        self.finish_code: int | None = None
        self.started_at = wall()
        self.nvml: Nvml | None = None
        self.notify = Notifier()
        self.next_extend = 0.0
        self.guard: thermal.ThermalGuard | None = None
        self.health: gpu_health.GpuHealth | None = None
        self.save_failed = False
        self._epoch_cache: dict[int, tuple] = {}
        self.epoch_log = EpochLog(cfg.paths.state_dir)
        self.epochs_failed = False
        self.sinks: Sinks | None = None  # notifications, metrics, the progress plot (never block the loop)

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self) -> int | None:
        """Lock, load state (a damaged one is moved aside), rebuild the epoch history; returns the
        process group of a trainer a killed supervisor left behind (-1: find it by its marker), if any."""
        safe_mkdir(self.cfg.paths.state_dir, follow_symlink=True)  # a linked state_dir is the admin's choice
        safe_mkdir(self.cfg.paths.state_dir / "attempts")         # a link planted inside it is refused
        self.lock.acquire()
        environment.clear_refused(self.cfg.paths.state_dir)  # this start got past its checks
        try:
            data = self.store.load(job.job_identity(self.cfg), lambda ev, **kw: self.log.warning(ev, **kw))
        except OSError as e:  # e.g. a directory named state.json: not ours to read, never deleted
            dest = move_aside(self.store.path, "corrupt")
            self.log.warning("state_moved_aside", path=str(self.store.path), moved_to=str(dest), why=str(e))
            data = None
        if data:
            try:
                self.sup = Sup.from_json(data.get("sup", {}), self.mono(), self.wall())
                self.attempts, self.changes = _records(data, "attempts"), _records(data, "changes")
            except (ValueError, TypeError) as e:
                dest = move_aside(self.store.path, "corrupt")
                self.log.warning("state_moved_aside", path=str(self.store.path), moved_to=str(dest), why=str(e))
                self.sup, self.attempts, self.changes = Sup(), [], []
        leftover = None
        cur = self.attempts[-1] if self.attempts else None
        if cur and cur.get("ended_at") is None:
            leftover = cur.get("pgid") or -1  # -1: recorded before its pid was known: find it by marker
            cur.update(ended_at=self.wall(), reason="supervisor_lost")
        if leftover is None and proc.marked_processes(self.cfg.paths.state_dir):
            leftover = -1  # a trainer of ours whose record was lost (state moved aside, a failed save)
        # The logs are the truth: replay them all (an earlier supervisor, or another machine, wrote them).
        replay(self.follower.drain(), self.history)
        try:  # epochs.jsonl starts as what the logs say, then grows by one line per epoch
            self.epoch_log.rewrite([r.to_json() for r in self.history.ordered()])
        except OSError as e:
            self.epochs_failed = True
            self.log.error("epoch_not_saved", path=str(self.epoch_log.path), error=e.strerror or str(e),
                           effect="supervision goes on; nnU-Net's own log has the epochs")
        if (last := self.history.last()) is not None:
            self.log.info("history_loaded", epochs=len(self.history.records), last_epoch=last.epoch,
                          ema=_r(last.ema), best_ema=_r(self.history.best_ema()))
        return leftover

    def _install_signals(self) -> None:
        self._wake_r, w = socket.socketpair()
        self._wake_r.setblocking(False)
        w.setblocking(False)
        self._wake_w = w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, lambda signum, _frame: self.sig_queue.append(signum))
                              for s in HANDLED_SIGNALS}
        self.sig_queue.extend(early_signals.take())  # arrived while `run` was starting
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")

    def _start_event(self, leftover, batch_size) -> Start:
        """What is on disk and in the process table now: the facts the first decision is made on."""
        fold = job.fold_dir(self.cfg)
        best = fold / "checkpoint_best.pth"
        return Start(final_checkpoint=(fold / "checkpoint_final.pth").is_file(),
                     best_checkpoint_ok=best.is_file() and checkpoints.verify(best) is None,
                     validation_done=(fold / "validation" / "summary.json").is_file(),
                     last_epoch=self.history.last(), batch_size=batch_size,
                     n_proc_da=job.configured_workers(self.cfg), leftover_pgid=leftover,
                     slurm_restarts=slurm.restart_count(),
                     others=other_trainers.as_event(other_trainers.find(self.cfg)),
                     take_over=self.take_over, gpu=fit.gpu_identity(self.cfg, self.nvml))

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Start-up in the order that makes every step safe: signal handlers first (a SIGHUP or SIGTERM
        from then on is recorded, never fatal: a systemd reload right after start, or a stop while the
        sensor is read), then the lock (nothing below ever runs twice on one state directory), then the
        sensors and the optional outputs; everything opened is closed in `_teardown`, whatever fails."""
        self._install_signals()
        decided = False
        try:
            bs = startup_batch_size(self.cfg)  # bad plans: exit 2 before anything is locked or started
            self._check_trainer_class()
            self._check_environment()
            leftover = self.prepare()
            self.nvml = Nvml.open()
            self.guard = thermal.ThermalGuard.open(self.cfg, self.nvml, self.log)
            self.health = gpu_health.open_for(self.cfg, self.nvml)
            if self.health is not None and (notes := self.health.notes()):
                self.log.warning("gpu_health_at_start", gpus=notes)
            self.sinks = Sinks.open(self.cfg, self.log)
            proc.become_subreaper()
            self.log.info("supervisor_started", pid=os.getpid(), config=str(self.cfg.path),
                          fold_dir=str(job.fold_dir(self.cfg)), target=self.cfg.target.ema_dice, batch_size=bs,
                          nvml=self.nvml is not None, systemd=self.notify.enabled)
            decided = True
            self.post(self._start_event(leftover, bs))
            self.pump()
            self.notify.ready(self._summary())
            while self.finish_code is None:
                self.turn()
        finally:
            self._teardown(decided)
        return self.finish_code

    def _check_trainer_class(self) -> None:
        """nnU-Net has no such -tr class: exit 2 now, with where it looked and the close matches, instead of
        a trainer that imports torch only to say so (trainer_class.py). Before the first decision, so it
        holds up nothing; any signal but our probe's own SIGCHLD ends the wait (the policy then decides
        what the signal means)."""
        problem = trainer_class.before_start(
            self.cfg, self.log, cancelled=lambda: any(s != signal.SIGCHLD for s in self.sig_queue))
        if problem is not None:
            raise ConfigError(self.cfg.path, [problem])

    def _check_environment(self) -> None:
        """Known-bad versions in the trainer's environment (core/known_bad.py: a second, nothing imported) and
        a cascade stage without the previous stage's prediction of every case (core/cascade.py): exit 2 now,
        naming the fix, instead of a trainer that fails (or runs 4x slower) after minutes of start-up."""
        cancelled = lambda: any(s != signal.SIGCHLD for s in self.sig_queue)  # noqa: E731
        problems = environment.before_start(self.cfg, self.log, cancelled=cancelled)
        if problems:
            raise ConfigError(f"the trainer's environment ({sys.executable})", problems)
        problems = cascade.before_start(self.cfg)
        if problems:
            raise ConfigError(self.cfg.path, problems)

    def _teardown(self, decided: bool) -> None:
        """Close what run() opened, newest first. A signal arriving now is still only recorded (a reload
        during teardown is ignored); the wake-up socket is detached from the signal machinery before it
        is closed, so no handler ever writes to a closed (or reused) descriptor."""
        self.end_fit()
        if self.guard is not None:
            self.guard.close()
        if self.health is not None:
            self.health.close()
        if decided:  # state.json and the last message only when the first decision was made
            self.notify.stopping(self._summary())
            self.save()
        if self.sinks is not None:
            self.sinks.close(timeout=5.0)  # the last message (e.g. gave_up) goes out before exit, bounded
        self.epoch_log.close()
        self.lock.release()
        if self.nvml is not None:
            self.nvml.close()
        self.notify.close()
        signal.set_wakeup_fd(-1)
        for s, old in self._old_handlers.items():  # as they were; a late SIGHUP must still not kill us
            signal.signal(s, signal.SIG_IGN if s == signal.SIGHUP and old == signal.SIG_DFL else old)
        self.sel.close()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def turn(self) -> None:
        for key, _mask in self.sel.select(self._timeout()):
            if key.data == "wakeup":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._read_stream(key.fileobj, key.data)
        while self.sig_queue:
            s = self.sig_queue.popleft()
            if s != signal.SIGCHLD:
                self.post(Signalled(signal.Signals(s).name, in_slurm=slurm.in_job()))
        self._watch_child()
        self.watch_fit()
        self._poll_log()
        for ev in (self.guard and self.guard.poll(self.mono(), self.cfg.paths.state_dir),
                   self.health and self.health.poll(self.mono())):
            if ev:
                self.post(ev)
        self.post(Tick())
        self.pump()
        if self.notify.enabled:  # systemd's STATUS=: only under systemd is it worth a line per turn
            self.notify.status(self._summary())
        self.notify.watchdog()
        left = criteria.stop_time_left(self.sup, self.mono(), self.cfg)
        if left is not None and self.mono() >= self.next_extend:
            # keep systemd's TimeoutStopSec from running out while the trainer stops gracefully, the wait
            # for its safe point (stop.checkpoint_wait_seconds) included
            self.next_extend = self.mono() + 10
            self.notify.extend_timeout(left)

    def _timeout(self) -> float:
        if self.child is not None and self.child.exited:
            return REAP_POLL_S
        t, now = LOG_POLL_S, self.mono()
        for d in (self.sup.restart_at, self.sup.stop_deadline, self.sup.safe_deadline):
            if d is not None:
                t = min(t, max(0.0, d - now))
        return t

    def _summary(self) -> str:
        return summary_line(self.sup, self.history.last(), self.cfg, self.mono())

    # ---- events from the world -------------------------------------------------------------
    def _read_stream(self, fobj, name: str) -> None:
        a = self.child
        try:
            data = os.read(fobj.fileno(), 65536)
        except BlockingIOError:
            return
        if data:
            self._forward(a, a.output.feed(name, data))
            return
        self.sel.unregister(fobj)
        fobj.close()
        a.open_streams -= 1
        self._forward(a, a.output.end(name))

    def _forward(self, a: Attempt, entries) -> None:
        for stream, text in entries:
            self.log.info(text, src="trainer", attempt=a.n, stream=stream)

    def _watch_child(self) -> None:
        """Measure the attempt: its output, activity and profile while it runs; its exit, then its remnants."""
        a = self.child
        if a is None:
            return
        if a.output is not None:
            self._forward(a, a.output.flush_stale())
        was_exited = a.exited
        if not a.poll():
            if (ev := a.sample(self.mono(), self.nvml)):
                self.post(ev)
            for ev in a.profiles(self.mono(), self.cfg):
                self.post(ev)
            return
        if not was_exited:
            self.post(TrainerExited(a.returncode))
            return
        proc.reap_zombies(skip={a.pid, self.guard.pid if self.guard else None})
        self.post(a.remnants(self.nvml))

    def _poll_log(self) -> None:
        for _name, line in self.follower.poll():
            ev = parse_line(line)
            if ev is None:
                continue
            if ev[0] == "epoch" and self.child is not None and not self.attempts[-1].get("epoch_seen"):
                # where the trainer really started: a resume from checkpoint_best rewinds
                self.attempts[-1].update(epoch_start=ev[1], epoch_seen=True)
                self.save()  # at once: a queue's master waits for a first epoch (past data loading) in state.json
            if ev[0] == "epoch":
                self.post(EpochStarted(ev[1]))
            elif ev[0] == "done":
                self.post(TrainingDone())
            rec = self.assembler.feed(ev)
            if rec is not None:
                rec = self.history.add(rec)
                self.log.info("epoch", epoch=rec.epoch, ema=_r(rec.ema), dice=[_r(d) for d in rec.dice],
                              train_loss=rec.train_loss, val_loss=rec.val_loss, epoch_time_s=rec.epoch_time,
                              best_ema=_r(self.history.best_ema()), attempt=self.sup.attempt)
                self.record_epoch(rec)
                ev = EpochDone(rec)
                self._publish(ev)
                self.post(ev)

    # ---- decisions and actions -------------------------------------------------------------
    def post(self, ev) -> None:
        self.events.append(ev)

    def pump(self) -> None:
        """Decide on every queued event in order; actions may queue follow-ups, handled in this loop.
        State is saved once the queue is empty when something durable changed (actions that must be
        durable first save themselves)."""
        start = self.sup
        while self.events:
            ev = self.events.popleft()
            self.sup, actions = decide(self.sup, ev, self.mono(), self.cfg)
            for act in actions:
                self.execute(act)
        if self.sup is not start and self.sup.durably_differs(start):
            self.save()


def _records(data: dict, key: str) -> list[dict]:
    v = data.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ValueError(f"{key}: expected a list of objects")
    return v


def _r(x, nd=4):
    return None if x is None or x != x else round(x, nd)
