"""The batch-size fit's probe child, as the daemon sees it: start it, notice its end, end it early.

How it works
- FitBatchSize (the policy's, core/rules_fit.py) starts `python -m supervisor.trainer.fit_probe REQUEST`
  in the trainer's environment (job.build_env) with three changes: nnUNet_results points to a scratch
  folder in the state directory (nnU-Net's trainer writes a training log and folders wherever it is told,
  and the fold's own logs must be the trainer's alone), nnUNet_compile=f (compiling anew for every batch
  size would spend the whole budget; the OOM step-down covers a compiled step that needs more), and the
  attempt marker (a supervisor killed meanwhile leaves a probe holding GPU memory; the next run stops it
  like a leftover trainer, proc.stop_leftovers).
- Its output goes to <state_dir>/attempts/batch-size-fit.log, not to a pipe (a pipe nobody reads fills up
  and blocks the child). The answer is the last `CARDIACSEG_PROBE <json>` line of that file (probes.MARKER),
  which the child writes again after every probe: a probe ended at its time bound still tells what it
  measured.
- The child never blocks the loop: `poll` (once per loop turn; SIGCHLD wakes the loop) returns its
  BatchSizeFitted once it has exited, so signals are handled as usual while it runs; the time bound is the
  policy's (Sup.fit_deadline -> CancelFit), and `kill` ends the child's whole process group.
- `MODEL_ENV` (CARDIACSEG_FIT_MODEL) is the test hook: a JSON memory model the child measures instead of
  CUDA (trainer/fit_probe.py), so CI runs the same search and choice without a GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from supervisor.config import job
from supervisor.core.events import BatchSizeFitted
from supervisor.integrations import proc
from supervisor.integrations.probes import MARKER

MODEL_ENV = "CARDIACSEG_FIT_MODEL"  # test hook: measure this memory model instead of CUDA
LOG_NAME = "batch-size-fit.log"
TAIL_BYTES = 1 << 20


def request(cfg, act) -> dict:
    """What the child needs to build the configuration's training step as nnUNetv2_train would."""
    plans = job.plans_file(cfg)
    return {"plans": str(plans), "dataset_json": str(plans.parent / "dataset.json"), "dataset": job.dataset_name(cfg),
            "configuration": cfg.training.configuration, "trainer": cfg.training.trainer,
            "plans_name": cfg.training.plans, "fold": str(cfg.training.fold), "batch_size": act.batch_size,
            "headroom": act.headroom, "iterations": act.iterations, "max_seconds": act.max_seconds}


def gpu_identity(cfg, nvml) -> tuple | None:
    """(UUID, name, total bytes) of the GPU the trainer will use (CUDA_VISIBLE_DEVICES as NVML maps it)."""
    if nvml is None or cfg.training.device != "cuda" or not cfg.tune.batch_size_fit:
        return None
    idx, why = nvml.select(job.build_env(cfg).get("CUDA_VISIBLE_DEVICES"), 1)
    return nvml.identity(idx[0]) if idx and not why else None


class FitChild:
    def __init__(self, popen: subprocess.Popen, log_path: Path, scratch: str, max_seconds: float):
        self.p, self.log_path, self.scratch, self.max_seconds = popen, log_path, scratch, max_seconds

    @classmethod
    def start(cls, cfg, act) -> "FitChild":
        """Start the probe child (OSError/ValueError: it could not be started)."""
        state_dir = Path(cfg.paths.state_dir)
        log_path = state_dir / "attempts" / LOG_NAME
        scratch = tempfile.mkdtemp(prefix="batch-size-fit-", dir=state_dir)
        env = job.build_env(cfg, overrides={"nnUNet_results": scratch, "nnUNet_compile": "f",
                                            proc.ATTEMPT_ENV: proc.attempt_marker(state_dir, "fit")})
        argv = [sys.executable, "-m", "supervisor.trainer.fit_probe", json.dumps(request(cfg, act))]
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                p = proc.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                               start_new_session=True, close_fds=True)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return cls(p, log_path, scratch, act.max_seconds)

    @property
    def pid(self) -> int:
        return self.p.pid

    def poll(self) -> BatchSizeFitted | None:
        """Its answer once it has exited; None while it runs."""
        if self.p.poll() is None:
            return None
        return self._finish(killed=False)

    def kill(self) -> BatchSizeFitted:
        """End it (its whole process group: it runs in its own session) and read what it measured."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.p.wait(timeout=2)  # SIGKILL: gone at once unless stuck in the driver; the loop waits no longer
        except subprocess.TimeoutExpired:
            proc.release(self.p)  # no longer ours to wait for: the loop's zombie reaping collects it when it goes
        return self._finish(killed=self.p.returncode is None or self.p.returncode < 0)

    def _finish(self, killed: bool) -> BatchSizeFitted:
        if self.p.returncode is not None:
            proc.release(self.p)
        shutil.rmtree(self.scratch, ignore_errors=True)
        answer, tail = read_answer(self.log_path)
        if answer is None:
            why = (f"no answer within [tune] fit_max_seconds = {self.max_seconds:g} s" if killed else
                   f"the probe exited {self.p.returncode} without an answer: {tail or 'no output'}")
            return BatchSizeFitted(error=f"{why} (its output: {self.log_path})")
        ev = to_event(answer, self.log_path)
        if killed and ev.error is None and ev.stopped is None:
            ev = dataclasses.replace(ev, stopped=f"ended at [tune] fit_max_seconds = {self.max_seconds:g} s")
        return ev


def read_answer(path: Path) -> tuple[dict | None, str]:
    """(the last answer line's JSON, the last line of output) from the child's log."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    tail = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    return read_answer_text("\n".join(lines)), tail


def read_answer_text(text: str) -> dict | None:
    """The last whole answer line's JSON in the child's output."""
    for line in reversed(text.splitlines()):
        if line.startswith(MARKER):
            try:
                doc = json.loads(line[len(MARKER):])
            except ValueError:
                continue  # a line cut short by the kill: the one before is whole
            return doc if isinstance(doc, dict) else None
    return None


def to_event(a: dict, log_path: Path) -> BatchSizeFitted:
    """The child's answer as an event; a malformed one is an error, never a crash of the loop."""
    def count(v, low):
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= low else None

    table, bad = [], None
    for row in a.get("table") if isinstance(a.get("table"), list) else []:
        ok = (isinstance(row, list) and len(row) == 3 and count(row[0], 1) is not None
              and (row[1] is None or count(row[1], 0) is not None)
              and isinstance(row[2], (int, float)) and not isinstance(row[2], bool) and 0 <= row[2] < 1e9)
        if not ok:
            bad = f"a probe row {row!r}"
            break
        table.append((row[0], row[1], float(row[2])))
    total = count(a.get("total_bytes"), 1)
    error = a.get("error") if isinstance(a.get("error"), str) else None
    if bad or (table and total is None and not error):
        error = f"the probe's answer is malformed ({bad or 'no total memory'}); its output: {log_path}"
    text = lambda k: a.get(k) if isinstance(a.get(k), str) else None  # noqa: E731
    return BatchSizeFitted(table=tuple(table), total_bytes=total, gpu=text("gpu"), uuid=text("uuid"),
                           upper=count(a.get("upper"), 1), upper_why=text("upper_why") or "",
                           stopped=text("stopped"), error=error, model=a.get("model") is True)
