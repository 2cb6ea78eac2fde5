"""Ask the trainer's Python a question: run one of supervisor/trainer's probe modules in a child process.

How it works: the supervisor never imports torch or nnunetv2 (it must start in milliseconds and never
hold a GPU context), so what only they can answer (does the trainer class exist? does this checkpoint
load with this torch and numpy?) is asked of a child: `python -m supervisor.trainer.<module> ARG` in the
trainer's environment (job.build_env: nnUNet_* paths, nnUNet_extTrainer, CUDA_VISIBLE_DEVICES), with a
timeout. The probe prints its answer as the last `CARDIACSEG_PROBE <json>` line on stdout; anything
else (torch's warnings, nnU-Net's banners) is ignored. `check` asks probe.py, `unpack` and `check` ask
resume_probe.py. `run` asks probe.py too, before its first decision, when a quick scan cannot find the
trainer class (integrations/trainer_class.py); there a signal cuts the wait short (`cancelled`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

from supervisor.integrations import proc

MARKER = "CARDIACSEG_PROBE "  # the trainer-side modules print their answer behind it
TIMEOUT_S = 180
CANCEL_POLL_S = 0.25  # how soon a `cancelled()` that turned true ends the wait


def ask(module: str, arg: str, env: dict | None, timeout: float = TIMEOUT_S,
        cancelled=None) -> tuple[dict | None, str]:
    """(answer, "") or (None, why there is none) from supervisor.trainer.<module>. `cancelled()`, checked
    while waiting, ends the child early (a stop asked for while `run` starts)."""
    argv = [sys.executable, "-m", f"supervisor.trainer.{module}", arg]
    try:
        r = _run(argv, env, timeout, cancelled)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:g} s"
    except InterruptedError:
        return None, "cut short by a signal"
    except OSError as e:
        return None, f"{sys.executable}: {e.strerror}"
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                return json.loads(line[len(MARKER):]), ""
            except ValueError:
                break
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit {r.returncode}: {tail}"


def _run(argv, env, timeout: float, cancelled) -> subprocess.CompletedProcess:
    if cancelled is None:
        return proc.run(argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    p = proc.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                   stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        with p:
            while True:
                left = deadline - time.monotonic()
                try:  # communicate() may be called again after its timeout: nothing read is lost
                    out, err = p.communicate(timeout=max(0.0, min(CANCEL_POLL_S, left)))
                    break
                except subprocess.TimeoutExpired:
                    over = time.monotonic() >= deadline
                    if over or cancelled():
                        p.kill()
                        p.communicate()
                        raise subprocess.TimeoutExpired(argv, timeout) if over else InterruptedError()
    finally:
        proc.release(p)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)
