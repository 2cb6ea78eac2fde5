"""Ask the trainer's Python a question: run one of supervisor/trainer's probe modules in a child process.

How it works: the supervisor never imports torch or nnunetv2 (it must start in milliseconds and never
hold a GPU context), so what only they can answer (does the trainer class exist? does this checkpoint
load with this torch and numpy?) is asked of a child: `python -m supervisor.trainer.<module> ARG` in the
trainer's environment (job.build_env: nnUNet_* paths, nnUNet_extTrainer, CUDA_VISIBLE_DEVICES), with a
timeout. The probe prints its answer as the last `CARDIACSEG_PROBE <json>` line on stdout; anything
else (torch's warnings, nnU-Net's banners) is ignored. `check` asks probe.py, `unpack` and `check` ask
resume_probe.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

from supervisor.integrations import proc

MARKER = "CARDIACSEG_PROBE "  # the trainer-side modules print their answer behind it
TIMEOUT_S = 180


def ask(module: str, arg: str, env: dict | None, timeout: float = TIMEOUT_S) -> tuple[dict | None, str]:
    """(answer, "") or (None, why there is none) from supervisor.trainer.<module>."""
    try:
        r = proc.run([sys.executable, "-m", f"supervisor.trainer.{module}", arg], env=env,
                     capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:g} s"
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
