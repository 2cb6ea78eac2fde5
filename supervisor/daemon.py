"""The main loop: turn what happened into events, ask policy.decide, carry out the actions.

How it works (after gunicorn's arbiter and torch.distributed.elastic's agent)
- Signal handlers only append the signal number to a queue; `signal.set_wakeup_fd` wakes the
  selector. SIGCHLD is handled too, so a trainer's death wakes the loop at once.
- One `selectors` loop waits on the trainer's stdout/stderr pipes and the wakeup socket, with a timeout
  that is the nearest of: the log poll (0.25 s), a policy deadline, or a quick re-check while reaping.
- Each turn: forward new trainer output (output.TrainerOutput), turn queued signals into StopRequested
  or a reload, notice the trainer's exit, poll the training log for epochs (EpochDone) and safe points,
  send a Tick, then tell systemd (STATUS=, WATCHDOG=1). Every event goes through `policy.decide`.
- When the trainer's main process exits, the rest of its process group (augmentation workers, DDP ranks)
  gets SIGKILL, and so does any process of the attempt seen while it ran (sampled every few seconds, so
  one that left the group is known too). ChildExited is reported only once they are all gone and, where
  NVML is available, none of them holds GPU memory (bounded by [oom].gpu_release_timeout_seconds).
- Batch size (plans file) and augmentation workers change only through SetBatchSize/SetWorkers actions;
  every change is recorded in state.json ("changes"). State is saved atomically after every decision
  that changed something and after every epoch.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections import deque

from . import checkpoints, job, logs, plans, proc, thermal
from .attempt import Attempt
from .classify import Exit, Reason
from .config import Config, ConfigError, load
from .gpu import Nvml
from .logparse import EpochAssembler, History, LogFollower, parse_line, replay
from .output import TrainerOutput
from .policy import (TERMINAL, ActionFailed, ChildExited, EpochDone, Finish, Log, NoCheckpoint, Reconfigured,
                     SafePoint, SetBatchSize, SetWorkers, SignalGroup, Spawn, Start, State,
                     StopRequested, Sup, Tick, decide)
from .reload import plan_reload
from .sdnotify import Notifier
from .status import summary_line
from .store import Lock, StateStore

LOG_POLL_S = 0.25
REAP_POLL_S = 0.05
REAP_LIMIT_S = 30.0
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Daemon:
    def __init__(self, cfg: Config, clock=time.time):
        self.cfg = cfg
        self.clock = clock
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
        self.finish_code: int | None = None
        self.started_at = clock()
        self.nvml: Nvml | None = None
        self.notify = Notifier()
        self.next_extend = 0.0
        self.last_progress = clock()
        self.final_phase = False  # "Training done." seen: final validation, no hang detection
        self.guard: thermal.ThermalGuard | None = None

    # ---- set-up --------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Lock, load state, stop a trainer a killed supervisor left behind, rebuild the epoch history."""
        self.cfg.paths.state_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.paths.state_dir / "attempts").mkdir(exist_ok=True)
        self.lock.acquire()
        data = self.store.load(job.job_identity(self.cfg), lambda ev, **kw: self.log.warning(ev, **kw))
        if data:
            self.sup = Sup.from_json(data.get("sup", {}))
            self.attempts = data.get("attempts", [])
            self.changes = data.get("changes", [])
        cur = self.attempts[-1] if self.attempts else None
        if cur and cur.get("ended_at") is None:
            if proc.same_process(cur.get("pid"), cur.get("create_time")):
                self.log.warning("stopping_leftover_trainer", pid=cur["pid"], attempt=cur.get("n"))
                proc.stop_group(cur["pgid"], self.cfg.stop.timeout_seconds)
            cur.update(ended_at=self.clock(), reason="supervisor_lost")
        if self.sup.state in TERMINAL or self.sup.state in (State.RUNNING, State.STOP_PENDING,
                                                            State.STOPPING, State.PAUSED):
            # A new run of the supervisor decides afresh (Start checks final checkpoint and target).
            self.sup = Sup(attempt=self.sup.attempt, restart_times=self.sup.restart_times,
                           consecutive_failures=self.sup.consecutive_failures,
                           original_batch_size=self.sup.original_batch_size, n_proc_da=self.sup.n_proc_da,
                           oom_steps=self.sup.oom_steps, paused_total=self.sup.paused_total)
        # The logs are the truth: replay them all (an earlier supervisor, or another machine, wrote them).
        replay(self.follower.poll(), self.history)
        if (last := self.history.last()) is not None:
            self.log.info("history_loaded", epochs=len(self.history.records), last_epoch=last.epoch,
                          ema=_r(last.ema), best_ema=_r(self.history.best_ema()))

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
        bs = plans.startup_batch_size(self.cfg)  # bad plans: exit 2 before anything is locked or started
        self.nvml = Nvml.open()
        self.guard = thermal.ThermalGuard.open(self.cfg, self.nvml, self.log)
        self.prepare()
        self._install_signals()
        proc.become_subreaper()
        self.log.info("supervisor_started", pid=os.getpid(), config=str(self.cfg.path),
                      fold_dir=str(job.fold_dir(self.cfg)), target=self.cfg.target.ema_dice, batch_size=bs,
                      nvml=self.nvml is not None, systemd=self.notify.enabled)
        try:
            self.dispatch(Start(final_checkpoint=(job.fold_dir(self.cfg) / "checkpoint_final.pth").is_file(),
                                last_epoch=self.history.last(), batch_size=bs,
                                n_proc_da=job.configured_workers(self.cfg)))
            self.notify.ready(self._summary())
            while self.finish_code is None:
                self.turn()
        finally:
            if self.guard is not None:
                self.guard.close()
            self.notify.stopping(self._summary())
            self.save()
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
            if s in (signal.SIGTERM, signal.SIGINT):
                self.dispatch(StopRequested(signal.Signals(s).name))
            elif s == signal.SIGHUP:
                self.reload()
        if self.child is not None:
            self._forward(self.child, self.child.output.flush_stale())
        self._check_child()
        self._poll_log()
        if self.guard is not None and (ev := self.guard.poll(self.clock(), self.sup, self.cfg.paths.state_dir)):
            self.dispatch(ev)
        self._check_hang()
        self.dispatch(Tick())
        self.notify.status(self._summary())
        self.notify.watchdog()
        if self.sup.state == State.STOPPING and time.monotonic() >= self.next_extend:
            # keep systemd's TimeoutStopSec from running out while the trainer stops gracefully
            self.next_extend = time.monotonic() + 10
            left = max(0.0, (self.sup.stop_deadline or self.clock()) - self.clock())
            self.notify.extend_timeout(left + REAP_LIMIT_S + 30)

    def _timeout(self) -> float:
        if self.child and self.child.returncode is not None:
            return REAP_POLL_S
        t, now = LOG_POLL_S, self.clock()
        for d in (self.sup.restart_at, self.sup.stop_deadline, self.sup.safe_deadline):
            if d is not None:
                t = min(t, max(0.0, d - now))
        return t

    def _summary(self) -> str:
        return summary_line(self.sup, self.history.last(), self.cfg, self.clock())

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
            self.dispatch(Reconfigured(self.history.last(), mid_epoch=self.assembler.current is not None))
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
        now = self.clock()
        if a.returncode is None:
            rc = a.popen.poll()
            if rc is None:
                a.sample(now)
                return
            a.returncode, a.reap_deadline = rc, now + REAP_LIMIT_S
            # The trainer is gone; what is left of it is useless and may hold GPU memory.
            proc.signal_group(a.pgid, signal.SIGKILL)
            for pid in a.survivors():
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
        a.output.close()
        self.child = None
        rec = self.attempts[-1]
        last = self.history.last()
        rec.update(ended_at=self.clock(), exit_code=a.returncode, epoch_reached=last.epoch if last else None)
        ooms = proc.cgroup_oom_kills()
        delta = None if ooms is None or a.oom_kills_at_start is None else ooms - a.oom_kills_at_start
        self.dispatch(ChildExited(Exit(returncode=a.returncode, stderr_tail=a.output.evidence(),
                                       final_checkpoint=(job.fold_dir(self.cfg) / "checkpoint_final.pth").is_file(),
                                       oom_kills_delta=delta)))
        rec["reason"] = self.sup.last_reason.value if self.sup.last_reason else None
        self.save()

    def _check_hang(self) -> None:
        a = self.child
        if a is None or a.returncode is not None or not self.cfg.hang.enabled or self.final_phase \
                or self.sup.state != State.RUNNING:
            return
        ev = a.stalled(self.clock(), self.last_progress, self.history, self.attempts[-1]["epoch_start"],
                       self.cfg, self.nvml)
        if ev is not None:
            self.dispatch(ev)

    def _gpu_released(self, a: Attempt) -> bool:
        """True once no process of the attempt holds GPU memory (or NVML cannot tell)."""
        if self.nvml is None:
            return True
        holders = self.nvml.compute_pids() & set(a.known)
        if not holders:
            return True
        if a.gpu_deadline is None:
            a.gpu_deadline = self.clock() + self.cfg.oom.gpu_release_timeout_seconds
            self.log.warning("waiting_for_gpu_memory", pids=sorted(holders))
        if self.clock() < a.gpu_deadline:
            return False
        self.log.error("gpu_memory_still_held", pids=sorted(holders), timeout_s=self.cfg.oom.gpu_release_timeout_seconds)
        return True

    def _poll_log(self) -> None:
        changed = False
        for _name, line in self.follower.poll():
            ev = parse_line(line)
            if ev is None:
                continue
            if ev[0] == "epoch" and self.child is not None and not self.attempts[-1].get("epoch_seen"):
                # where the trainer really started: a resume from checkpoint_best rewinds
                self.attempts[-1].update(epoch_start=ev[1], epoch_seen=True)
            if ev[0] in ("epoch", "done"):
                self.last_progress = self.clock()
                self.final_phase = ev[0] == "done"
                self.dispatch(SafePoint())
            rec = self.assembler.feed(ev)
            if rec is not None:
                rec = self.history.add(rec)
                changed = True
                self.log.info("epoch", epoch=rec.epoch, ema=_r(rec.ema), dice=[_r(d) for d in rec.dice],
                              train_loss=rec.train_loss, val_loss=rec.val_loss, epoch_time_s=rec.epoch_time,
                              best_ema=_r(self.history.best_ema()), attempt=self.sup.attempt)
                self.dispatch(EpochDone(rec))
        if changed:
            self.save()

    # ---- decisions and actions -------------------------------------------------------------
    def dispatch(self, ev) -> None:
        before = self.sup
        self.sup, actions = decide(self.sup, ev, self.clock(), self.cfg)
        if before.state == State.PAUSED and self.sup.state != State.PAUSED and before.paused_at is not None:
            self.last_progress += self.clock() - before.paused_at  # a pause is never a stall
        for act in actions:
            self.execute(act)
        if self.sup != before:
            self.save()

    def execute(self, act) -> None:
        if isinstance(act, Log):
            getattr(self.log, act.level)(act.event, **act.fields)
        elif isinstance(act, Spawn):
            self._spawn()
        elif isinstance(act, SignalGroup):
            if self.child is not None:
                proc.signal_group(self.child.pgid, act.sig)
                self.log.info("signal_sent", signal=signal.Signals(act.sig).name, pgid=self.child.pgid)
        elif isinstance(act, Finish):
            self.finish_code = act.code
        elif isinstance(act, SetBatchSize):
            path = job.plans_file(self.cfg)
            try:
                old, backup = plans.set_batch_size(path, self.cfg.training.configuration, act.new)
            except (plans.PlansError, OSError) as e:
                self.dispatch(ActionFailed(f"could not lower the batch size in {path}: {e}"))
                return
            self._record_change("batch_size", old, act.new, file=str(path), backup=str(backup))
        elif isinstance(act, SetWorkers):
            self._record_change("nnUNet_n_proc_DA", act.old, act.new)
        else:  # pragma: no cover - a new action type without an executor is a bug
            raise TypeError(f"unknown action {act!r}")

    def _record_change(self, what: str, old, new, **extra) -> None:
        ch = {"at": self.clock(), "attempt": self.sup.attempt, "what": what, "old": old, "new": new,
              "reason": self.sup.last_reason.value if self.sup.last_reason else None, **extra}
        self.changes.append(ch)
        self.log.warning("changed", **ch)
        self.save()

    def _pick_checkpoint(self):
        prev = self.attempts[-2] if len(self.attempts) >= 2 else None
        suspect = prev["resume_from"] if prev and prev.get("reason") == Reason.CORRUPT_CHECKPOINT.value else None
        return checkpoints.choose(job.fold_dir(self.cfg), suspect, self.cfg, self.history, self.log,
                                  lambda name, dest, why: self._record_change("checkpoint", name, dest, why=why))

    def _spawn(self) -> None:
        n = self.sup.attempt
        ok, ckpt = self._pick_checkpoint()
        if not ok:
            self.attempts.append({"n": n, "argv": None, "started_at": self.clock(), "ended_at": self.clock(),
                                  "exit_code": None, "reason": "no_checkpoint", "resume_from": None,
                                  "epoch_start": None, "epoch_reached": None, "log": None})
            self.dispatch(NoCheckpoint(
                "every checkpoint in the fold folder was unreadable and has been moved aside (*.corrupt-*); "
                "set [checkpoint].allow_fresh_start = true to start again from epoch 0, or put a good "
                "checkpoint back"))
            return
        argv = job.build_argv(self.cfg, resume=ckpt is not None)
        overrides = {"nnUNet_n_proc_DA": str(self.sup.n_proc_da)} if self.sup.n_proc_da else {}
        log_path = self.cfg.paths.state_dir / "attempts" / f"attempt-{n:04d}.log"
        last = self.history.last()
        rec = {"n": n, "argv": argv, "started_at": self.clock(), "ended_at": None, "exit_code": None,
               "reason": None, "resume_from": ckpt.name if ckpt else None,
               "epoch_start": (last.epoch + 1) if last else 0, "epoch_reached": None, "log": str(log_path)}
        self.attempts.append(rec)
        try:
            popen = proc.spawn(argv, job.build_env(self.cfg, overrides=overrides))
        except OSError as e:
            # Nothing started: report it like a trainer that died at once with the reason on stderr.
            rec.update(ended_at=self.clock(), exit_code=127)
            self.log.error("spawn_failed", argv=argv, error=str(e))
            self.dispatch(ChildExited(Exit(returncode=127, stderr_tail=f"cannot execute {argv[0]}: {e}")))
            rec["reason"] = self.sup.last_reason.value if self.sup.last_reason else None
            return
        self.child = Attempt(n, popen, TrainerOutput(log_path), self.clock())
        self.last_progress, self.final_phase = self.clock(), False
        for name, fobj in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            os.set_blocking(fobj.fileno(), False)
            self.sel.register(fobj, selectors.EVENT_READ, name)
        rec.update(pid=popen.pid, pgid=popen.pid, create_time=self.child.known[popen.pid])
        self.log.info("attempt_started", attempt=n, pid=popen.pid, resume_from=rec["resume_from"],
                      argv=" ".join(argv))
        self.save()

    def save(self) -> None:
        self.store.save({
            "job": job.job_identity(self.cfg),
            "supervisor": {"pid": os.getpid(), "started_at": self.started_at, "config": str(self.cfg.path)},
            "settings": {"ema_dice": self.cfg.target.ema_dice, "min_class_dice": self.cfg.target.min_class_dice,
                         "expected_epochs": self.cfg.training.expected_epochs, "max_restarts": self.cfg.restart.max_restarts,
                         "window_minutes": self.cfg.restart.window_minutes},
            "sup": self.sup.to_json(),
            "attempts": self.attempts,
            "epochs": [r.to_json() for r in self.history.ordered()],
            "changes": self.changes,
            "status_line": self._summary(),
        })


def _r(x, nd=4):
    return None if x is None or x != x else round(x, nd)
