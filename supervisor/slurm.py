"""SLURM adapter: where the supervisor runs inside a SLURM job, and `scontrol requeue` for it.

How it works: everything comes from the job's environment (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID,
SLURM_ARRAY_TASK_ID, SLURM_RESTART_COUNT, SLURMD_NODENAME, SLURM_CPUS_PER_TASK). `requeue()` runs
SLURM's own client command with a timeout and reports (ok, message); it never raises. The decision to
requeue is the policy's (on a stop for SIGUSR1/SIGTERM inside a job, bounded by slurm.max_requeues).
"""
from __future__ import annotations

import os
import subprocess

REQUEUE_TIMEOUT_S = 30


def in_job(env=None) -> bool:
    return bool((os.environ if env is None else env).get("SLURM_JOB_ID"))


def job_spec(env=None) -> str | None:
    """The id `scontrol requeue` needs: ARRAYJOBID_TASKID for an array task, else the job id."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def restart_count(env=None) -> int | None:
    env = os.environ if env is None else env
    if not in_job(env):
        return None
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def info(env=None) -> dict | None:
    """What status shows about the job (None outside SLURM)."""
    env = os.environ if env is None else env
    if not in_job(env):
        return None
    return {"job_id": env.get("SLURM_JOB_ID"), "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "array_task": env.get("SLURM_ARRAY_TASK_ID"), "node": env.get("SLURMD_NODENAME"),
            "restart_count": restart_count(env), "spec": job_spec(env)}


def requeue(spec: str, timeout: float = REQUEUE_TIMEOUT_S) -> tuple[bool, str]:
    try:
        r = subprocess.run(["scontrol", "requeue", spec], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"scontrol requeue {spec}: {e}"
    if r.returncode != 0:
        return False, f"scontrol requeue {spec} exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}"
    return True, f"scontrol requeue {spec}"
