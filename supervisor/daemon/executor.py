"""Carrying out the policy's actions, and the supervisor's durable record (state.json).

How it works: `Executor` is the half of the Daemon that acts (loop.py is the half that waits and
reports). `execute` looks the action's type up in HANDLERS and carries it out: start or adopt an
attempt (the attempt is recorded durably before the fork), signal it, kill its remnants and collect its
exit, inspect the fold's checkpoints and move bad ones aside, write the batch size in the plans file (the
OOM step-down, the batch-size fit), run the fit's probe child (integrations/fit.py; the loop polls it),
stop a leftover trainer, measure the disk, ask SLURM, re-read the config, log, and hand the policy's
decisions (StateChanged, Diagnosed, a started attempt) to the sinks. An action whose result matters
reports a follow-up event with `self.post`; nothing here decides. Each effect is logged after it
succeeded. `save` writes state.json atomically, a small record whatever the run's length; each finished
epoch is appended to epochs.jsonl (`record_epoch`, converted to JSON once); a full or broken state
directory is warned about once and supervision goes on.
"""
from __future__ import annotations

import os
import selectors
import shutil
import signal

from supervisor.config import job
from supervisor.config.loader import ConfigError, load
from supervisor.config.reload import plan_reload
from supervisor.core import actions as A
from supervisor.core import criteria
from supervisor.core.classify import Exit
from supervisor.core.events import (ActionFailed, BatchSizeFitted, BatchSizeSet, CheckpointsInspected, ChildExited,
                                    DiskSpace, Reconfigured, Requeued, SlurmJobState)
from supervisor.daemon.attempt import Attempt
from supervisor.daemon.trainer_output import TrainerOutput
from supervisor.integrations import checkpoints, epoch_log, fit, log_setup, plans, proc, slurm
from supervisor.integrations.store import StateSaveError, UnsafePathError, move_aside


class Executor:
    fit_child: fit.FitChild | None = None  # the batch-size fit's probe while it runs

    def execute(self, act) -> None:
        HANDLERS[type(act)](self, act)

    # ---- records and outputs --------------------------------------------------------------------
    def _log(self, act: A.Log) -> None:
        getattr(self.log, act.level)(act.event, **act.fields)

    def _publish(self, item) -> None:
        if self.sinks is not None:
            self.sinks.publish(item)

    def _state_changed(self, act: A.StateChanged) -> None:
        self.log.info("state_changed", old_state=act.old, new_state=act.new, cause=act.cause, attempt=act.attempt,
                      **({"detail": act.detail} if act.detail else {}))
        self._publish(act)

    def _attempt_ended(self, act: A.AttemptEnded) -> None:
        if self.attempts and self.attempts[-1].get("n") == act.attempt:  # none when stopped before its start
            self.attempts[-1]["reason"] = act.reason
        extra = {"evidence": act.evidence} if act.evidence not in (None, act.reason) else {}
        getattr(self.log, "info" if act.expected else "warning")(
            "attempt_ended", attempt=act.attempt, reason=act.reason, exit_code=act.exit_code, **extra)

    def _finish(self, act: A.Finish) -> None:
        self.finish_code = int(act.code)

    def _record_change(self, what: str, old, new, **extra) -> None:
        ch = {"at": self.wall(), "attempt": self.sup.attempt, "what": what, "old": old, "new": new,
              "reason": self.sup.last_reason.value if self.sup.last_reason else None, **extra}
        self.changes.append(ch)
        self.log.warning("changed", **ch)
        self.save()

    # ---- the trainer's processes ------------------------------------------------------------------
    def _signal(self, act: A.SignalGroup) -> None:
        if self.child is not None and self.child.signal(act.sig):
            self.log.info("signal_sent", signal=signal.Signals(act.sig).name, pgid=self.child.pgid)

    def _kill_remnants(self, act: A.KillRemnants) -> None:
        a = self.child
        if a is None:
            return
        a.signal(signal.SIGKILL)  # the trainer is gone; what is left of it is useless and may hold GPU memory
        a.learn(proc.marked_processes(self.cfg.paths.state_dir, a.n))  # one scan: then known by start time
        a.learn(proc.orphans())  # a daemon of the trainer's that double-forked, setsid, no marker
        for pid in a.survivors():
            proc.kill_pid(pid)

    def _stop_leftover(self, act: A.StopLeftover) -> None:
        cur = self.attempts[-1] if self.attempts else {}
        proc.stop_leftovers(act.pgid if act.pgid > 0 else None, cur.get("members") or {}, self.cfg.paths.state_dir,
                            self.cfg.stop.timeout_seconds, self.log)

    def _spawn(self, act: A.Spawn) -> None:
        for name, why in act.move_aside:
            if not self._move_aside(A.MoveAside(name, why)):
                return  # ActionFailed is queued: no trainer may load what could not be moved away
        n = self.sup.attempt
        last = self.history.last()
        rec = {"n": n, "argv": None, "started_at": self.wall(), "ended_at": None, "exit_code": None,
               "reason": None, "resume_from": act.resume_from, "validate_only": act.validate_only,
               "epoch_start": (last.epoch + 1) if last else 0, "epoch_reached": None, "log": None}
        self.attempts.append(rec)
        argv = job.build_argv(self.cfg, resume=act.resume) + (["--val"] if act.validate_only else [])
        overrides = {proc.ATTEMPT_ENV: proc.attempt_marker(self.cfg.paths.state_dir, n),
                     **criteria.trainer_overrides(self.sup, self.cfg)}
        log_path = job.attempt_log(self.cfg, n)
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
        self.child = Attempt(n, popen.pid, self.mono(), popen=popen, output=output, profile_path=profile_path,
                             nvml=self.nvml)
        rec.update(pid=popen.pid, pgid=popen.pid, create_time=self.child.known[popen.pid],
                   members=self.child.members())
        self.save()
        for name, fobj in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            os.set_blocking(fobj.fileno(), False)
            self.sel.register(fobj, selectors.EVENT_READ, name)
        self.log.info("attempt_started", attempt=n, pid=popen.pid, resume_from=act.resume_from, argv=" ".join(argv))
        self._publish(act)

    def _adopt(self, act: A.Adopt) -> None:
        for pid in act.pids:
            try:
                os.kill(pid, 0)
            except PermissionError:
                self.post(ActionFailed("Adopt", f"cannot take over pid {pid}: it belongs to another user and "
                                                "cannot be signalled; stop it yourself, then start again"))
                return
            except ProcessLookupError:
                pass  # gone already: seen as its exit
        n = self.sup.attempt
        self.child = Attempt(n, act.pids[0], self.mono(), adopted=act.pids, nvml=self.nvml)
        self.attempts.append({"n": n, "argv": None, "started_at": self.wall(), "ended_at": None, "exit_code": None,
                              "reason": None, "resume_from": None, "adopted": list(act.pids),
                              "pid": act.pids[0], "pgid": self.child.pgid, "members": self.child.members()})
        self.save()
        self.log.warning("take_over_adopted", pids=list(act.pids), pgid=self.child.pgid)

    def _collect_exit(self, act: A.CollectExit) -> None:
        """The attempt is over: its last lines, its evidence, its record; reports ChildExited."""
        a = self.child
        if a is None:
            return
        for key in [k for k in self.sel.get_map().values() if k.data != "wakeup"]:
            self.sel.unregister(key.fileobj)  # a stream a surviving grandchild still holds open
            key.fileobj.close()
            if a.output is not None:
                self._forward(a, a.output.end(key.data))
        self._poll_log()  # the last lines the trainer wrote belong to this attempt
        for ev in a.profiles(self.mono(), self.cfg):
            self.post(ev)
        evidence = ""
        if a.output is not None:
            evidence = a.output.evidence()
            a.output.close()
        self.child = None
        last = self.history.last()
        self.attempts[-1].update(ended_at=self.wall(), exit_code=a.returncode,
                                 epoch_reached=last.epoch if last else None)
        ooms = proc.cgroup_oom_kills()
        delta = None if ooms is None or a.oom_kills_at_start is None else ooms - a.oom_kills_at_start
        fold = job.fold_dir(self.cfg)
        best = fold / "checkpoint_best.pth"
        self.post(ChildExited(Exit(returncode=a.returncode, stderr_tail=evidence,
                                   final_checkpoint=(fold / "checkpoint_final.pth").is_file(), oom_kills_delta=delta),
                              best_checkpoint_ok=best.is_file() and checkpoints.verify(best) is None,
                              log=self.attempts[-1].get("log")))

    # ---- files ------------------------------------------------------------------------------------
    def _inspect_checkpoints(self, act: A.InspectCheckpoints) -> None:
        fold = job.fold_dir(self.cfg)
        found = tuple((p.name, checkpoints.verify(p) if act.verify else None) for p in job.existing_checkpoints(self.cfg))
        last = self.history.last()
        self.post(CheckpointsInspected(found=found, stale_temps=tuple(checkpoints.stale_temp_files(fold)),
                                       last_epoch=last.epoch if last else None,
                                       best_epoch=self.history.best_epoch(),
                                       trained_s=self.history.trained_seconds()))

    def _move_aside(self, act: A.MoveAside) -> bool:
        path = job.fold_dir(self.cfg) / act.file
        try:
            dest = move_aside(path, "corrupt")
        except OSError as e:
            self.post(ActionFailed("MoveAside", f"could not move the unreadable {path} aside ({act.why}): "
                                                f"{e.strerror or e}; --c would load it"))
            return False
        self.log.error("checkpoint_moved_aside", file=act.file, moved_to=str(dest), why=act.why)
        self._record_change("checkpoint", act.file, str(dest), why=act.why)
        return True

    def _remove_stale_temps(self, act: A.RemoveStaleTemps) -> None:
        for name in act.files:
            try:
                (job.fold_dir(self.cfg) / name).unlink()
            except OSError:
                continue
            self.log.info("removed_stale_temp_file", file=name)

    def _set_batch_size(self, act: A.SetBatchSize) -> None:
        path, conf = job.plans_file(self.cfg), self.cfg.training.configuration
        try:
            if act.fit:
                old, new, backup = plans.fit_batch_size(path, conf, act.old, act.new)
            else:
                old, new, backup = plans.lower_batch_size(path, conf, act.new)
        except (plans.PlansError, OSError) as e:
            self.post(ActionFailed("SetBatchSize", f"could not {'write the fitted' if act.fit else 'lower the'} "
                                                   f"batch size in {path}: {e}"))
            return
        if new != old:
            self._record_change("batch_size", old, new, file=str(path), backup=str(backup),
                                **({"reason": "batch_size_fit"} if act.fit else {}))
        self.post(BatchSizeSet(act.old, new))

    # ---- the batch-size fit's probe child (integrations/fit.py) ------------------------------------
    def _fit_batch_size(self, act: A.FitBatchSize) -> None:
        try:
            self.fit_child = fit.FitChild.start(self.cfg, act)
        except (OSError, ValueError) as e:
            self.post(BatchSizeFitted(error=f"could not start the probe: {getattr(e, 'strerror', None) or e}"))
            return
        self.log.info("batch_size_fit_probe", pid=self.fit_child.pid, output=str(self.fit_child.log_path))

    def _cancel_fit(self, act: A.CancelFit) -> None:
        child, self.fit_child = self.fit_child, None
        if child is None and not act.report:
            return
        # no child: its answer is already queued, and this one is ignored as a second answer
        ev = child.kill() if child is not None else BatchSizeFitted(error="the probe had already ended")
        if act.report:
            self.post(ev)

    def watch_fit(self) -> None:
        """Once per loop turn: the probe's answer once it has exited."""
        if self.fit_child is not None and (ev := self.fit_child.poll()) is not None:
            self.fit_child = None
            self.post(ev)

    def end_fit(self) -> None:
        """Teardown: a probe still running ends with the supervisor (it would hold the GPU)."""
        if self.fit_child is not None:
            self.fit_child.kill()
            self.fit_child = None

    def _set_workers(self, act: A.SetWorkers) -> None:
        self._record_change("nnUNet_n_proc_DA", act.old, act.new)

    def _set_compile(self, act: A.SetCompile) -> None:
        self._record_change("nnUNet_compile", "t", "f", why=act.why, revert='training.compile = "on"')

    def _measure_disk(self, act: A.MeasureDisk) -> None:
        fold = job.fold_dir(self.cfg)
        folder = next((p for p in (fold, *fold.parents) if p.exists()), fold)
        sizes = [p.stat().st_size for p in job.existing_checkpoints(self.cfg)]
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = 0
        self.post(DiskSpace(free_bytes=free, largest_checkpoint=max(sizes, default=0), folder=str(folder),
                            existing=len(sizes)))

    # ---- the world around -------------------------------------------------------------------------
    def _reload(self, act: A.Reload) -> None:
        """Re-read config.toml; apply what can change live; a bad file changes nothing."""
        self.notify.reloading()
        try:
            new = self.shape(load(self.cfg.path))
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), kept="the previous configuration")
        else:
            rp = plan_reload(self.cfg, new)
            self.cfg = rp.config
            log_setup.setup(self.cfg.logging.level)
            if self.guard is not None:
                self.guard.configure(self.cfg)
            self.log.info("reloaded", applied=list(rp.live), next_restart=list(rp.next_attempt))
            if rp.needs_restart:
                self.log.warning("reload_needs_supervisor_restart", keys=list(rp.needs_restart),
                                 why="they name the job itself; the old values stay until a restart")
            self.post(Reconfigured(self.history.last()))
        self.notify.ready(self._summary())

    def _query_slurm(self, act: A.QuerySlurmJob) -> None:
        self.post(SlurmJobState(slurm.job_state(slurm.job_spec() or "")))

    def _requeue(self, act: A.Requeue) -> None:
        self.save()  # the requeue ends this job at once: state first
        result, msg = slurm.requeue(slurm.job_spec() or "")
        if result == "requeued":
            self.log.warning("requeued", command=msg)
        self.post(Requeued(result, msg))

    # ---- state.json ---------------------------------------------------------------------------------
    SNAPSHOT_EPOCHS = 20  # what the sinks see of the epochs: the last few (the picture reads the file)

    def _epoch_json(self, r) -> dict:
        """A record converted to JSON once (the last few are handed to the sinks after every save)."""
        hit = self._epoch_cache.get(r.epoch)
        if hit is None or hit[0] is not r:
            hit = self._epoch_cache[r.epoch] = (r, r.to_json())
            for e in [e for e in self._epoch_cache if e < r.epoch - self.SNAPSHOT_EPOCHS]:
                del self._epoch_cache[e]
        return hit[1]

    def record_epoch(self, rec) -> None:
        """Append a finished epoch to epochs.jsonl (state.json stays small: see epoch_log.py)."""
        try:
            self.epoch_log.append(self._epoch_json(rec))
        except (OSError, UnsafePathError) as e:  # UnsafePathError: the file keeps being replaced by a link
            if not self.epochs_failed:
                self.log.error("epoch_not_saved", path=str(self.epoch_log.path), epoch=rec.epoch,
                               error=getattr(e, "strerror", None) or str(e), effect="supervision goes on; nnU-Net's own log has the epoch")
            self.epochs_failed = True
        else:
            if self.epochs_failed:
                self.log.info("epochs_saved_again", path=str(self.epoch_log.path))
            self.epochs_failed = False

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
            "epochs_file": epoch_log.FILE, "epoch_count": len(self.history.records),
            "changes": self.changes,
            "status_line": self._summary(),
            "slurm": slurm.info(),
        }
        if self.sinks is not None:
            self.sinks.snapshot({**data, "temps": dict(self.sup.temps), "updated_at": self.wall(),
                                 "epochs": [self._epoch_json(r) for r in self.history.tail(self.SNAPSHOT_EPOCHS)],
                                 "best_ema": self.history.best_ema()})
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


HANDLERS = {
    A.Log: Executor._log, A.StateChanged: Executor._state_changed, A.AttemptEnded: Executor._attempt_ended,
    A.Finish: Executor._finish, A.Diagnosed: Executor._publish, A.SignalGroup: Executor._signal,
    A.KillRemnants: Executor._kill_remnants, A.StopLeftover: Executor._stop_leftover, A.Spawn: Executor._spawn,
    A.Adopt: Executor._adopt, A.CollectExit: Executor._collect_exit,
    A.InspectCheckpoints: Executor._inspect_checkpoints, A.MoveAside: Executor._move_aside,
    A.RemoveStaleTemps: Executor._remove_stale_temps, A.SetBatchSize: Executor._set_batch_size,
    A.FitBatchSize: Executor._fit_batch_size, A.CancelFit: Executor._cancel_fit,
    A.SetWorkers: Executor._set_workers, A.SetCompile: Executor._set_compile, A.MeasureDisk: Executor._measure_disk, A.Reload: Executor._reload,
    A.QuerySlurmJob: Executor._query_slurm, A.Requeue: Executor._requeue,
}
