"""The main loop: turn what happened into events, ask policy.decide, carry out the actions.

How it works (after gunicorn's arbiter and torch.distributed.elastic's agent)
- Signal handlers only append the signal number to a queue; `signal.set_wakeup_fd` wakes the
  selector. SIGCHLD is handled too, so a trainer's death wakes the loop at once.
- One `selectors` loop waits on the trainer's stdout/stderr pipes and the wakeup socket, with a timeout
  that is the nearest of: the log poll (0.25 s), a policy deadline, or a quick re-check while reaping.
- Each turn: forward new trainer output (per-attempt log file + our log, stderr tail kept as evidence),
  turn queued signals into StopRequested, notice the trainer's exit, poll the training log for epochs
  (EpochDone) and safe points, then send a Tick. Every event goes through `policy.decide`.
- When the trainer's main process exits, the rest of its process group (augmentation workers, DDP ranks)
  gets SIGKILL and the loop waits until the group is empty before it reports ChildExited: the next
  attempt must never meet GPU memory held by a previous one (nnU-Net issues #469, #2814).
- Every process of the attempt seen while it ran (sampled every few seconds, so one that left the group
  with setsid is known too) must be gone, and, where NVML is available, none of them may still hold
  GPU memory, before the next attempt starts (bounded by [oom].gpu_release_timeout_seconds).
- Batch size (plans file) and augmentation workers are changed only through SetBatchSize/SetWorkers
  actions decided by the policy, and every change is recorded in state.json ("changes").
- State is saved atomically after every decision that changed something and after every epoch.
"""
from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from collections import deque
from pathlib import Path

from . import job, logs, plans, proc
from .classify import Exit
from .config import Config, ConfigError
from .gpu import Nvml
from .logparse import EpochAssembler, EpochRecord, History, LogFollower, parse_line
from .policy import (TERMINAL, ActionFailed, ChildExited, EpochDone, Finish, Log, SafePoint,
                     SetBatchSize, SetWorkers, SignalGroup, Spawn, Start, State, StopRequested, Sup,
                     Tick, decide)
from .store import Lock, StateStore

LOG_POLL_S = 0.25
REAP_POLL_S = 0.05
REAP_LIMIT_S = 30.0
DESCENDANT_SAMPLE_S = 2.0
NNUNET_DEFAULT_N_PROC_DA = 12  # nnunetv2.utilities.default_n_proc_DA, capped at the CPU count
STDERR_TAIL_BYTES = 64 * 1024
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Attempt:
    """The running trainer: its process, pipes, output buffers and log file."""

    def __init__(self, n: int, popen, log_path: Path):
        self.n = n
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session: the trainer leads its own group
        self.log_fh = open(log_path, "ab")
        self.partial = {"stdout": b"", "stderr": b""}
        self.stderr_tail = bytearray()
        self.open_streams = 2
        self.returncode: int | None = None
        self.reap_deadline: float | None = None
        self.gpu_deadline: float | None = None
        self.known: dict[int, float | None] = {self.pid: proc.process_start_time(self.pid)}
        self.next_sample = 0.0


class Daemon:
    def __init__(self, cfg: Config, clock=time.time):
        self.cfg = cfg
        self.clock = clock
        self.log = logs.get()
        self.store = StateStore(cfg.state_dir)
        self.lock = Lock(cfg.state_dir)
        self.sup = Sup()
        self.attempts: list[dict] = []
        self.history = History()
        self.follower = LogFollower(job.fold_dir(cfg))
        self.assembler = EpochAssembler()
        self.child: Attempt | None = None
        self.sel = selectors.DefaultSelector()
        self.sig_queue: deque[int] = deque()
        self.finish_code: int | None = None
        self.started_at = clock()
        self.changes: list[dict] = []
        self.nvml: Nvml | None = None

    # ---- set-up --------------------------------------------------------------------------------
    def _warn(self, event, **kw):
        self.log.warning(event, **kw)

    def prepare(self) -> None:
        """Lock, load state, rebuild the epoch history from the logs, adopt nothing half-dead."""
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.state_dir / "attempts").mkdir(exist_ok=True)
        self.lock.acquire()
        data = self.store.load(job.job_identity(self.cfg), self._warn)
        if data:
            self.sup = Sup.from_json(data.get("sup", {}))
            self.attempts = data.get("attempts", [])
            self.history = History([EpochRecord.from_json(r) for r in data.get("epochs", [])])
            self.changes = data.get("changes", [])
        self._stop_leftover_trainer()
        if self.sup.state in TERMINAL or self.sup.state in (State.RUNNING, State.STOP_PENDING,
                                                            State.STOPPING):
            # A new run of the supervisor: decide afresh (Start checks final checkpoint / target).
            self.sup = Sup(attempt=self.sup.attempt, restart_times=self.sup.restart_times,
                           consecutive_failures=self.sup.consecutive_failures)
        self._replay_logs()

    def current_batch_size(self) -> int | None:
        """The plan's batch size, validated at start-up (ConfigError names the file and key)."""
        if not self.cfg.oom_enabled:
            return None
        try:
            bs = plans.read_batch_size(job.plans_file(self.cfg), self.cfg.configuration)
        except plans.PlansError as e:
            raise ConfigError(self.cfg.path, [f"[oom] needs the plans file: {e}"]) from None
        if self.cfg.oom_min_batch_size > bs:
            raise ConfigError(self.cfg.path, [
                f"oom.min_batch_size: expected <= the plan's batch size {bs} "
                f"({job.plans_file(self.cfg)}: configurations.{self.cfg.configuration}.batch_size), "
                f"got {self.cfg.oom_min_batch_size}"])
        return bs

    def configured_workers(self) -> int:
        v = job.build_env(self.cfg).get("nnUNet_n_proc_DA")
        try:
            return max(1, int(v)) if v is not None else min(NNUNET_DEFAULT_N_PROC_DA, os.cpu_count() or 1)
        except ValueError:
            return min(NNUNET_DEFAULT_N_PROC_DA, os.cpu_count() or 1)

    def _stop_leftover_trainer(self) -> None:
        """A supervisor killed by SIGKILL leaves its trainer running: stop it before starting anew."""
        cur = self.attempts[-1] if self.attempts else None
        if not cur or cur.get("ended_at") is not None:
            return
        pid, pgid = cur.get("pid"), cur.get("pgid")
        if proc.same_process(pid, cur.get("create_time")):
            self.log.warning("stopping_leftover_trainer", pid=pid, attempt=cur.get("n"))
            proc.signal_group(pgid, signal.SIGINT)
            deadline = self.clock() + self.cfg.timeout_seconds
            while proc.group_alive(pgid) and self.clock() < deadline:
                time.sleep(0.2)
            proc.signal_group(pgid, signal.SIGKILL)
            while proc.group_alive(pgid) and self.clock() < deadline + REAP_LIMIT_S:
                time.sleep(0.1)
        cur.update(ended_at=self.clock(), reason="supervisor_lost", exit_code=None)

    def _replay_logs(self) -> None:
        for _name, line in self.follower.poll():
            ev = parse_line(line)
            if ev is not None and (rec := self.assembler.feed(ev)) is not None:
                self.history.add(rec)
        self.assembler = EpochAssembler()  # a half-logged epoch of a dead attempt is not continued
        if (last := self.history.last()) is not None:
            self.log.info("history_loaded", epochs=len(self.history.records), last_epoch=last.epoch,
                          ema=_r(last.ema), best_ema=_r(self.history.best_ema()))

    def _install_signals(self) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        for s in HANDLED_SIGNALS:
            signal.signal(s, lambda signum, _frame: self.sig_queue.append(signum))
        self.sel.register(r, selectors.EVENT_READ, "wakeup")

    # ---- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        bs = self.current_batch_size()  # bad plans: exit 2 before anything is locked or started
        self.prepare()
        self._install_signals()
        proc.become_subreaper()
        self.nvml = Nvml.open()
        self.log.info("supervisor_started", pid=os.getpid(), config=str(self.cfg.path),
                      fold_dir=str(job.fold_dir(self.cfg)), target=self.cfg.ema_dice, batch_size=bs,
                      nvml=self.nvml is not None)
        try:
            self.dispatch(Start(final_checkpoint=(job.fold_dir(self.cfg) / "checkpoint_final.pth")
                                .is_file(), last_epoch=self.history.last(), batch_size=bs,
                                n_proc_da=self.configured_workers()))
            while self.finish_code is None:
                self.turn()
        finally:
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
                self.on_reload()
        self._check_child()
        self._poll_log()
        self.dispatch(Tick())

    def _timeout(self) -> float:
        if self.child and self.child.returncode is not None:
            return REAP_POLL_S
        t = LOG_POLL_S
        now = self.clock()
        for d in (self.sup.restart_at, self.sup.stop_deadline, self.sup.safe_deadline):
            if d is not None:
                t = min(t, max(0.0, d - now))
        return t

    def on_reload(self) -> None:
        self.log.info("reload_ignored", why="SIGHUP reload is not implemented yet")

    # ---- events from the world -------------------------------------------------------------
    def _read_stream(self, fobj, name: str) -> None:
        a = self.child
        try:
            data = os.read(fobj.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fobj)
            fobj.close()
            a.open_streams -= 1
            if a.partial[name]:
                self._emit_line(a, name, a.partial[name])
                a.partial[name] = b""
            return
        a.log_fh.write(data)
        a.log_fh.flush()
        if name == "stderr":
            a.stderr_tail += data
            del a.stderr_tail[:-STDERR_TAIL_BYTES]
        buf = a.partial[name] + data
        *lines, a.partial[name] = buf.split(b"\n")
        for ln in lines:
            self._emit_line(a, name, ln)

    def _emit_line(self, a: Attempt, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            self.log.info(text, src="trainer", attempt=a.n, stream=stream)

    def _sample_descendants(self, a: Attempt) -> None:
        now = self.clock()
        if now < a.next_sample:
            return
        a.next_sample = now + DESCENDANT_SAMPLE_S
        for pid in proc.descendants(a.pid):
            if pid not in a.known:
                a.known[pid] = proc.process_start_time(pid)

    def _survivors(self, a: Attempt) -> list[int]:
        return [pid for pid, t in a.known.items() if pid != a.pid and proc.same_process(pid, t)]

    def _check_child(self) -> None:
        a = self.child
        if a is None:
            return
        if a.returncode is None:
            rc = a.popen.poll()
            if rc is None:
                self._sample_descendants(a)
                return
            a.returncode = rc
            a.reap_deadline = self.clock() + REAP_LIMIT_S
            # The trainer is gone; whatever is left of its group is useless and may hold GPU memory.
            proc.signal_group(a.pgid, signal.SIGKILL)
            for pid in self._survivors(a):  # left the group (setsid) but still ours
                proc.kill_pid(pid)
        proc.reap_zombies(skip={a.pid})
        if (proc.group_alive(a.pgid) or a.open_streams or self._survivors(a)) \
                and self.clock() < a.reap_deadline:
            return
        if proc.group_alive(a.pgid):
            self.log.error("group_not_empty", pgid=a.pgid, members=proc.group_members(a.pgid))
        if not self._gpu_released(a):
            return
        for fobj in [k.fileobj for k in self.sel.get_map().values() if k.data != "wakeup"]:
            self.sel.unregister(fobj)
            fobj.close()
        self._poll_log()  # the last lines the trainer wrote belong to this attempt
        a.log_fh.close()
        self.child = None
        final = (job.fold_dir(self.cfg) / "checkpoint_final.pth").is_file()
        rec = self.attempts[-1]
        rec.update(ended_at=self.clock(), exit_code=a.returncode,
                   epoch_reached=(self.history.last().epoch if self.history.last() else None))
        ooms = proc.cgroup_oom_kills()
        delta = None if ooms is None or self._oom_kills_at_spawn is None else ooms - self._oom_kills_at_spawn
        self.dispatch(ChildExited(Exit(returncode=a.returncode,
                                       stderr_tail=a.stderr_tail.decode("utf-8", "replace"),
                                       final_checkpoint=final, oom_kills_delta=delta)))
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
            a.gpu_deadline = self.clock() + self.cfg.oom_gpu_release_timeout
            self.log.warning("waiting_for_gpu_memory", pids=sorted(holders))
        if self.clock() < a.gpu_deadline:
            return False
        self.log.error("gpu_memory_still_held", pids=sorted(holders),
                       timeout_s=self.cfg.oom_gpu_release_timeout)
        return True

    def _poll_log(self) -> None:
        changed = False
        for _name, line in self.follower.poll():
            ev = parse_line(line)
            if ev is None:
                continue
            if ev[0] in ("epoch", "done"):
                self.dispatch(SafePoint())
            rec = self.assembler.feed(ev)
            if rec is not None:
                rec = self.history.add(rec)
                changed = True
                self.log.info("epoch", epoch=rec.epoch, ema=_r(rec.ema), dice=[_r(d) for d in rec.dice],
                              train_loss=rec.train_loss, val_loss=rec.val_loss,
                              epoch_time_s=rec.epoch_time, best_ema=_r(self.history.best_ema()),
                              attempt=self.sup.attempt)
                self.dispatch(EpochDone(rec))
        if changed:
            self.save()

    # ---- decisions and actions -------------------------------------------------------------
    def dispatch(self, ev) -> None:
        before = self.sup
        self.sup, actions = decide(self.sup, ev, self.clock(), self.cfg)
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
                old, backup = plans.set_batch_size(path, self.cfg.configuration, act.new)
            except (plans.PlansError, OSError) as e:
                self.dispatch(ActionFailed(f"could not lower the batch size in {path}: {e}"))
                return
            self._record_change("batch_size", old, act.new, file=str(path), backup=str(backup))
        elif isinstance(act, SetWorkers):
            self._record_change("nnUNet_n_proc_DA", act.old, act.new)
        else:  # pragma: no cover - a new action type without an executor is a bug
            raise TypeError(f"unknown action {act!r}")

    _oom_kills_at_spawn: int | None = None

    def _record_change(self, what: str, old, new, **extra) -> None:
        ch = {"at": self.clock(), "attempt": self.sup.attempt, "what": what, "old": old, "new": new,
              "reason": self.sup.last_reason.value if self.sup.last_reason else None, **extra}
        self.changes.append(ch)
        self.log.warning("changed", **ch)
        self.save()

    def _spawn(self) -> None:
        n = self.sup.attempt
        ckpt = job.resume_checkpoint(self.cfg)
        argv = job.build_argv(self.cfg, resume=ckpt is not None)
        overrides = {"nnUNet_n_proc_DA": str(self.sup.n_proc_da)} if self.sup.n_proc_da else {}
        env = job.build_env(self.cfg, overrides=overrides)
        log_path = self.cfg.state_dir / "attempts" / f"attempt-{n:04d}.log"
        last = self.history.last()
        rec = {"n": n, "argv": argv, "started_at": self.clock(), "ended_at": None,
               "exit_code": None, "reason": None, "resume_from": ckpt.name if ckpt else None,
               "epoch_start": (last.epoch + 1) if last else 0, "epoch_reached": None,
               "log": str(log_path)}
        self.attempts.append(rec)
        self._oom_kills_at_spawn = proc.cgroup_oom_kills()
        try:
            popen = proc.spawn(argv, env)
        except OSError as e:
            # Nothing started: report it like a trainer that died at once with the reason on stderr.
            rec.update(ended_at=self.clock(), exit_code=127)
            self.log.error("spawn_failed", argv=argv, error=str(e))
            self.dispatch(ChildExited(Exit(returncode=127, stderr_tail=f"cannot execute {argv[0]}: {e}")))
            rec["reason"] = self.sup.last_reason.value if self.sup.last_reason else None
            return
        self.child = Attempt(n, popen, log_path)
        for name, fobj in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            os.set_blocking(fobj.fileno(), False)
            self.sel.register(fobj, selectors.EVENT_READ, name)
        rec.update(pid=popen.pid, pgid=popen.pid, create_time=proc.process_start_time(popen.pid))
        self.log.info("attempt_started", attempt=n, pid=popen.pid, resume_from=rec["resume_from"],
                      argv=" ".join(argv))
        self.save()

    def save(self) -> None:
        self.store.save({
            "job": job.job_identity(self.cfg),
            "supervisor": {"pid": os.getpid(), "started_at": self.started_at,
                           "config": str(self.cfg.path)},
            "settings": {"ema_dice": self.cfg.ema_dice, "min_class_dice": self.cfg.min_class_dice,
                         "expected_epochs": self.cfg.expected_epochs,
                         "max_restarts": self.cfg.max_restarts,
                         "window_minutes": self.cfg.window_minutes},
            "sup": self.sup.to_json(),
            "attempts": self.attempts,
            "epochs": [r.to_json() for r in self.history.ordered()],
            "changes": self.changes,
            "oom": {"min_batch_size": self.cfg.oom_min_batch_size, "enabled": self.cfg.oom_enabled},
        })


def _r(x, nd=4):
    return None if x is None or x != x else round(x, nd)
