"""Carrying out the policy's actions, and the supervisor's durable record (state.json).

How it works: `Actions` is the half of the Daemon that acts (daemon.py is the half that waits and
reports). `execute` carries out one action returned by policy.decide: start an attempt (verify the
checkpoint --c will load first, record the attempt durably before the fork), signal the trainer's group,
lower the batch size in the plans file, stop a leftover trainer, measure the disk, requeue a SLURM job,
log an event and hand it to the sinks. An action whose result matters reports a follow-up event with
`self.post` (BatchSizeSet / ActionFailed, NoCheckpoint, ChildExited for a program that cannot start,
DiskSpace, Requeued); nothing here decides. Each effect is logged after it succeeded. `save` writes
state.json atomically (each epoch converted to JSON once); a full or broken state directory is warned
about once and supervision goes on.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal

from . import checkpoints, job, plans, proc, slurm
from .attempt import Attempt
from .classify import Exit, Reason
from .events import (ActionFailed, BatchSizeSet, ChildExited, DiskSpace, Finish, Log, MeasureDisk, NoCheckpoint,
                     Requeue, Requeued, SetBatchSize, SetWorkers, SignalGroup, Spawn, StopLeftover)
from .output import TrainerOutput
from .store import StateSaveError


class Actions:
    def execute(self, act) -> None:
        if isinstance(act, Log):
            self._event(act.level, act.event, **act.fields)
        elif isinstance(act, Spawn):
            self._spawn(act.validate_only)
        elif isinstance(act, SignalGroup):
            if self.child is not None and proc.signal_group(self.child.pgid, act.sig):
                self.log.info("signal_sent", signal=signal.Signals(act.sig).name, pgid=self.child.pgid)
        elif isinstance(act, Finish):
            self.finish_code = int(act.code)
        elif isinstance(act, SetBatchSize):
            path = job.plans_file(self.cfg)
            try:
                old, new, backup = plans.lower_batch_size(path, self.cfg.training.configuration, act.new)
            except (plans.PlansError, OSError) as e:
                self.post(ActionFailed("SetBatchSize", f"could not lower the batch size in {path}: {e}"))
                return
            if new < old:
                self._record_change("batch_size", old, new, file=str(path), backup=str(backup))
            self.post(BatchSizeSet(act.old, new))
        elif isinstance(act, SetWorkers):
            self._record_change("nnUNet_n_proc_DA", act.old, act.new)
        elif isinstance(act, StopLeftover):
            cur = self.attempts[-1] if self.attempts else {}
            pgid = act.pgid if act.pgid > 0 else None
            proc.stop_leftovers(pgid, cur.get("members") or {}, self.cfg.paths.state_dir,
                                self.cfg.stop.timeout_seconds, self.log)
        elif isinstance(act, Requeue):
            self.save()  # the requeue ends this job at once: state first
            result, msg = slurm.requeue(slurm.job_spec() or "")
            if result == "requeued":
                self.log.warning("requeued", command=msg)
            self.post(Requeued(result, msg))
        elif isinstance(act, MeasureDisk):
            self.post(self._measure_disk())
        else:  # pragma: no cover - a new action type without an executor is a bug
            raise TypeError(f"unknown action {act!r}")

    def _event(self, level: str, event: str, **fields) -> None:
        """Log one supervisor event and hand it to the sinks (notifications, metrics, plot marks)."""
        getattr(self.log, level)(event, **fields)
        if self.sinks is not None:
            self.sinks.publish(event, fields, None)

    def _measure_disk(self) -> DiskSpace:
        fold = job.fold_dir(self.cfg)
        folder = next((p for p in (fold, *fold.parents) if p.exists()), fold)
        sizes = [p.stat().st_size for p in job.existing_checkpoints(self.cfg)] or [0]
        # the default launcher writes a temporary copy beside the old file: room for two of the largest
        needed = 2 * max(sizes) + 64 * 2**20
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
        return DiskSpace(free_bytes=free, needed_bytes=needed, folder=str(folder))

    def _record_change(self, what: str, old, new, **extra) -> None:
        ch = {"at": self.wall(), "attempt": self.sup.attempt, "what": what, "old": old, "new": new,
              "reason": self.sup.last_reason.value if self.sup.last_reason else None, **extra}
        self.changes.append(ch)
        self.log.warning("changed", **ch)
        self.save()

    def _pick_checkpoint(self):
        prev = self.attempts[-1] if self.attempts else None  # called before the new record is appended
        suspect = prev["resume_from"] if prev and prev.get("reason") == Reason.CORRUPT_CHECKPOINT.value else None
        return checkpoints.choose(job.fold_dir(self.cfg), suspect, self.cfg, self.history, self.log,
                                  lambda name, dest, why: self._record_change("checkpoint", name, dest, why=why))

    def _spawn(self, validate_only: bool) -> None:
        n = self.sup.attempt
        ok, ckpt = self._pick_checkpoint()
        last = self.history.last()
        rec = {"n": n, "argv": None, "started_at": self.wall(), "ended_at": None, "exit_code": None,
               "reason": None, "resume_from": ckpt.name if ckpt else None, "validate_only": validate_only,
               "epoch_start": (last.epoch + 1) if last else 0, "epoch_reached": None, "log": None}
        self.attempts.append(rec)
        if not ok:
            rec.update(ended_at=self.wall(), reason="no_checkpoint")
            self.post(NoCheckpoint(
                "every checkpoint in the fold folder was unreadable and has been moved aside (*.corrupt-*); "
                "set [checkpoint].allow_fresh_start = true to start again from epoch 0, or put a good "
                "checkpoint back"))
            return
        argv = job.build_argv(self.cfg, resume=ckpt is not None and not validate_only)
        if validate_only:
            argv.append("--val")
        overrides = {proc.ATTEMPT_ENV: proc.attempt_marker(self.cfg.paths.state_dir, n)}
        if self.sup.n_proc_da:
            overrides["nnUNet_n_proc_DA"] = str(self.sup.n_proc_da)
        log_path = self.cfg.paths.state_dir / "attempts" / f"attempt-{n:04d}.log"
        profile_path = log_path.with_suffix(".profile.jsonl")  # the launcher's per-epoch timings
        overrides["CARDIACSEG_PROFILE_FILE"] = str(profile_path)
        rec.update(argv=argv, log=str(log_path))
        # Durable before the trainer exists: a supervisor killed right after the fork finds this record
        # (no pid yet) and stops every process carrying the attempt's marker.
        self.save()
        try:
            popen = proc.spawn(argv, job.build_env(self.cfg, overrides=overrides))
        except (OSError, ValueError) as e:
            # Nothing started: report it like a trainer that died at once with the reason on stderr.
            rec.update(ended_at=self.wall(), exit_code=127)
            self.log.error("spawn_failed", argv=argv, error=str(e))
            self.post(ChildExited(Exit(returncode=127, stderr_tail=f"cannot execute {argv[0]}: {e}")))
            return
        output = TrainerOutput(log_path, warn=lambda ev, **kw: self.log.warning(ev, attempt=n, **kw))
        self.child = Attempt(n, popen, output, self.mono(), profile_path, self.nvml)
        rec.update(pid=popen.pid, pgid=popen.pid, create_time=self.child.known[popen.pid],
                   members=self.child.members())
        self.save()
        for name, fobj in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            os.set_blocking(fobj.fileno(), False)
            self.sel.register(fobj, selectors.EVENT_READ, name)
        self._event("info", "attempt_started", attempt=n, pid=popen.pid, resume_from=rec["resume_from"],
                    argv=" ".join(argv))

    def _epochs_json(self) -> list[dict]:
        """The epochs for state.json; a record is converted once (saves come after every epoch, for days)."""
        out = []
        for r in self.history.ordered():
            hit = self._epoch_cache.get(r.epoch)
            if hit is None or hit[0] is not r:
                hit = self._epoch_cache[r.epoch] = (r, r.to_json())
            out.append(hit[1])
        return out

    def save(self) -> None:
        if self.child is not None and self.attempts:
            self.attempts[-1]["members"] = self.child.members()
        data = {
            "job": job.job_identity(self.cfg),
            "supervisor": {"pid": os.getpid(), "started_at": self.started_at, "config": str(self.cfg.path)},
            "settings": {"ema_dice": self.cfg.target.ema_dice, "min_class_dice": self.cfg.target.min_class_dice,
                         "expected_epochs": self.cfg.training.expected_epochs,
                         "max_restarts": self.cfg.restart.max_restarts,
                         "window_minutes": self.cfg.restart.window_minutes},
            "sup": self.sup.to_json(self.mono(), self.wall()),
            "attempts": self.attempts,
            "epochs": self._epochs_json(),
            "changes": self.changes,
            "status_line": self._summary(),
            "slurm": slurm.info(),
        }
        if self.sinks is not None:
            self.sinks.snapshot({**data, "temps": dict(self.sup.temps), "updated_at": self.wall()})
        try:
            self.store.save(data)
        except (OSError, StateSaveError) as e:  # a full or broken state directory must not leave the trainer unsupervised
            if not self.save_failed:
                self.log.error("state_not_saved", path=str(self.store.path), error=getattr(e, "strerror", None) or str(e),
                               effect="supervision goes on; state.json is stale until the disk has room")
            self.save_failed = True
        else:
            if self.save_failed:
                self.log.info("state_saved_again", path=str(self.store.path))
            self.save_failed = False
