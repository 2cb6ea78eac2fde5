"""The main loop: turn what happened into events, queue them, ask policy.decide, carry out the actions.

How it works (after gunicorn's arbiter and torch.distributed.elastic's agent)
- Signal handlers only append the signal number to a queue; `signal.set_wakeup_fd` wakes the
  selector. SIGCHLD is handled too, so a trainer's death wakes the loop at once.
- One `selectors` loop waits on the trainer's stdout/stderr pipes and the wakeup socket, with a timeout
  that is the nearest of: the log poll (0.25 s), a policy deadline, or a quick re-check while reaping.
- Each turn the adapters report events into one FIFO queue: forwarded trainer output, signals
  (StopRequested, a reload's Reconfigured), the trainer's exit (ChildExited), log lines (EpochStarted,
  EpochDone, TrainingDone), an activity sample (Activity), a temperature poll (Readings), and a Tick.
  `pump()` hands them to `policy.decide` one at a time with a MONOTONIC `now`; the actions are carried
  out by `execute`, and an action whose result matters reports a follow-up event into the same queue
  (BatchSizeSet / ActionFailed, NoCheckpoint, DiskSpace): the dispatcher is never re-entered. Wall-clock
  time only goes into records shown to people (attempts, changes, state.json's updated_at).
- When the trainer's main process exits, the rest of its process group (augmentation workers, DDP ranks)
  gets SIGKILL, and so does any process of the attempt seen while it ran. ChildExited is reported only
  once they are all gone and, where NVML is available, none of them holds GPU memory.
- Carrying out the actions and writing state.json live in actions.py (the Actions half of this class).
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections import deque

from . import checkpoints, job, logs, proc, slurm, thermal
from .actions import Actions
from .attempt import Attempt
from .check import startup_batch_size
from .classify import Exit
from .config import Config, ConfigError, load
from .events import ChildExited, EpochDone, EpochStarted, Reconfigured, Start, StopRequested, Tick, TrainingDone
from .gpu import Nvml
from .logparse import EpochAssembler, History, LogFollower, parse_line, replay
from .policy import State, Sup, decide
from .reload import plan_reload
from .sdnotify import Notifier
from .sinks import Sinks
from .statusline import summary_line
from .store import Lock, StateStore, move_aside, safe_mkdir

LOG_POLL_S = 0.25
REAP_POLL_S = 0.05
REAP_LIMIT_S = 30.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)


class Daemon(Actions):
    def __init__(self, cfg: Config, mono=time.monotonic, wall=time.time):
        self.cfg, self.mono, self.wall = cfg, mono, wall
        self.log = logs.get()
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
        self.save_failed = False
        self._epoch_cache: dict[int, tuple] = {}
        self.sinks: Sinks | None = None  # notifications, metrics, the progress plot (never block the loop)

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self) -> int | None:
        """Lock, load state (a damaged one is moved aside), rebuild the epoch history; returns the
        process group of a trainer a killed supervisor left behind, if any of it is still alive."""
        safe_mkdir(self.cfg.paths.state_dir, follow_symlink=True)  # a linked state_dir is the admin's choice
        safe_mkdir(self.cfg.paths.state_dir / "attempts")         # a link planted inside it is refused
        self.lock.acquire()
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
        for s in HANDLED_SIGNALS:
            signal.signal(s, lambda signum, _frame: self.sig_queue.append(signum))
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wakeup")

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        bs = startup_batch_size(self.cfg)  # bad plans: exit 2 before anything is locked or started
        self.nvml = Nvml.open()
        self.guard = thermal.ThermalGuard.open(self.cfg, self.nvml, self.log)
        self.sinks = Sinks.open(self.cfg, self.log)
        leftover = self.prepare()
        self._install_signals()
        proc.become_subreaper()
        fold = job.fold_dir(self.cfg)
        self._event("info", "supervisor_started", pid=os.getpid(), config=str(self.cfg.path), fold_dir=str(fold),
                    target=self.cfg.target.ema_dice, batch_size=bs, nvml=self.nvml is not None,
                    systemd=self.notify.enabled)
        try:
            best = fold / "checkpoint_best.pth"
            self.post(Start(final_checkpoint=(fold / "checkpoint_final.pth").is_file(),
                            best_checkpoint_ok=best.is_file() and checkpoints.verify(best) is None,
                            validation_done=(fold / "validation" / "summary.json").is_file(),
                            last_epoch=self.history.last(), batch_size=bs,
                            n_proc_da=job.configured_workers(self.cfg), leftover_pgid=leftover,
                            slurm_restarts=slurm.restart_count()))
            self.pump()
            self.notify.ready(self._summary())
            while self.finish_code is None:
                self.turn()
        finally:
            if self.guard is not None:
                self.guard.close()
            self.notify.stopping(self._summary())
            self.save()
            self.sinks.close(timeout=5.0)  # the last message (e.g. gave_up) goes out before exit, bounded
            self.lock.release()
            if self.nvml is not None:
                self.nvml.close()
        return self.finish_code

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
            if s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                # inside a SLURM job, SIGUSR1 (time limit near) and SIGTERM (preemption) mean "requeue me"
                preempt = slurm.in_job() and s in (signal.SIGTERM, signal.SIGUSR1)
                if s == signal.SIGUSR1 and not preempt:
                    self.log.info("signal_ignored", signal="SIGUSR1", why="not inside a SLURM job")
                    continue
                self.post(StopRequested(signal.Signals(s).name, preempt=preempt))
            elif s == signal.SIGHUP:
                self.reload()
        if self.child is not None:
            self._forward(self.child, self.child.output.flush_stale())
            if self.child.returncode is None and (ev := self.child.sample(self.mono(), self.nvml)):
                self.post(ev)
            for ev in self.child.profiles(self.mono(), self.cfg):
                self.post(ev)
        self._check_child()
        self._poll_log()
        if self.guard is not None and (ev := self.guard.poll(self.mono(), self.cfg.paths.state_dir)):
            self.post(ev)
        self.post(Tick())
        self.pump()
        self.notify.status(self._summary())
        self.notify.watchdog()
        if self.sup.state == State.STOPPING and self.mono() >= self.next_extend:
            # keep systemd's TimeoutStopSec from running out while the trainer stops gracefully
            self.next_extend = self.mono() + 10
            left = max(0.0, (self.sup.stop_deadline or self.mono()) - self.mono())
            self.notify.extend_timeout(left + REAP_LIMIT_S + 30)

    def _timeout(self) -> float:
        if self.child and self.child.returncode is not None:
            return REAP_POLL_S
        t, now = LOG_POLL_S, self.mono()
        for d in (self.sup.restart_at, self.sup.stop_deadline, self.sup.safe_deadline):
            if d is not None:
                t = min(t, max(0.0, d - now))
        return t

    def _summary(self) -> str:
        return summary_line(self.sup, self.history.last(), self.cfg, self.mono())

    def reload(self) -> None:
        """SIGHUP: re-read config.toml; apply what can change live; a bad file changes nothing."""
        self.notify.reloading()
        try:
            new = load(self.cfg.path)
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), kept="the previous configuration")
        else:
            rp = plan_reload(self.cfg, new)
            self.cfg = rp.config
            logs.setup(self.cfg.logging.level)
            self.log.info("reloaded", applied=list(rp.live), next_restart=list(rp.next_attempt))
            if rp.needs_restart:
                self.log.warning("reload_needs_supervisor_restart", keys=list(rp.needs_restart),
                                 why="they name the job itself; the old values stay until a restart")
            self.post(Reconfigured(self.history.last()))
        self.notify.ready(self._summary())

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

    def _check_child(self) -> None:
        a = self.child
        if a is None:
            return
        now = self.mono()
        if a.returncode is None:
            rc = a.popen.poll()
            if rc is None:
                return
            a.returncode, a.reap_deadline = rc, now + REAP_LIMIT_S
            # whether our SIGINT came first decides if our stop explains the exit (not what happens while
            # the rest of the tree is reaped)
            a.after_our_stop = self.sup.state == State.STOPPING
            # The trainer is gone; what is left of it is useless and may hold GPU memory.
            proc.signal_group(a.pgid, signal.SIGKILL)
            for pid in a.survivors() + proc.marked_processes(self.cfg.paths.state_dir, a.n):
                proc.kill_pid(pid)
        proc.reap_zombies(skip={a.pid, self.guard.pid if self.guard else None})
        if (proc.group_alive(a.pgid) or a.open_streams or a.survivors()) and now < a.reap_deadline:
            return
        if proc.group_alive(a.pgid):
            self.log.error("group_not_empty", pgid=a.pgid, members=proc.group_members(a.pgid))
        if not self._gpu_released(a):
            return
        for fobj in [k.fileobj for k in self.sel.get_map().values() if k.data != "wakeup"]:
            self.sel.unregister(fobj)
            fobj.close()
        self._poll_log()  # the last lines the trainer wrote belong to this attempt
        for ev in a.profiles(self.mono(), self.cfg):
            self.post(ev)
        a.output.close()
        self.child = None
        rec = self.attempts[-1]
        last = self.history.last()
        rec.update(ended_at=self.wall(), exit_code=a.returncode, epoch_reached=last.epoch if last else None)
        ooms = proc.cgroup_oom_kills()
        delta = None if ooms is None or a.oom_kills_at_start is None else ooms - a.oom_kills_at_start
        best = job.fold_dir(self.cfg) / "checkpoint_best.pth"
        self.post(ChildExited(Exit(returncode=a.returncode, stderr_tail=a.output.evidence(),
                                   final_checkpoint=(job.fold_dir(self.cfg) / "checkpoint_final.pth").is_file(),
                                   oom_kills_delta=delta),
                              best_checkpoint_ok=best.is_file() and checkpoints.verify(best) is None,
                              after_our_stop=a.after_our_stop))
        self.pump()
        rec["reason"] = self.sup.last_reason.value if self.sup.last_reason else None
        self.save()

    def _gpu_released(self, a: Attempt) -> bool:
        """True once no process of the attempt holds GPU memory (or NVML cannot tell)."""
        if self.nvml is None:
            return True
        holders = self.nvml.compute_pids() & set(a.known)
        if not holders:
            return True
        if a.gpu_deadline is None:
            a.gpu_deadline = self.mono() + self.cfg.oom.gpu_release_timeout_seconds
            self.log.warning("waiting_for_gpu_memory", pids=sorted(holders))
        if self.mono() < a.gpu_deadline:
            return False
        self.log.error("gpu_memory_still_held", pids=sorted(holders),
                       timeout_s=self.cfg.oom.gpu_release_timeout_seconds)
        return True

    def _poll_log(self) -> None:
        for _name, line in self.follower.poll():
            ev = parse_line(line)
            if ev is None:
                continue
            if ev[0] == "epoch" and self.child is not None and not self.attempts[-1].get("epoch_seen"):
                # where the trainer really started: a resume from checkpoint_best rewinds
                self.attempts[-1].update(epoch_start=ev[1], epoch_seen=True)
            if ev[0] == "epoch":
                self.post(EpochStarted(ev[1]))
            elif ev[0] == "done":
                self.post(TrainingDone())
            rec = self.assembler.feed(ev)
            if rec is not None:
                rec = self.history.add(rec)
                self._event("info", "epoch", epoch=rec.epoch, ema=_r(rec.ema), dice=[_r(d) for d in rec.dice],
                            train_loss=rec.train_loss, val_loss=rec.val_loss, epoch_time_s=rec.epoch_time,
                            best_ema=_r(self.history.best_ema()), attempt=self.sup.attempt)
                self.post(EpochDone(rec))

    # ---- decisions and actions -------------------------------------------------------------
    def post(self, ev) -> None:
        self.events.append(ev)

    def pump(self) -> None:
        """Decide on every queued event in order; actions may queue follow-ups, handled in this loop.
        State is saved once the queue is empty (actions that must be durable first save themselves)."""
        start = self.sup
        while self.events:
            ev = self.events.popleft()
            self.sup, actions = decide(self.sup, ev, self.mono(), self.cfg)
            for act in actions:
                self.execute(act)
        if self.sup != start:
            self.save()

def _records(data: dict, key: str) -> list[dict]:
    v = data.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise ValueError(f"{key}: expected a list of objects")
    return v


def _r(x, nd=4):
    return None if x is None or x != x else round(x, nd)
