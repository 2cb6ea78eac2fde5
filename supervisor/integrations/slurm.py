"""SLURM adapter: where the supervisor runs inside a SLURM job, and `scontrol requeue` for it.

How it works: everything comes from the job's environment (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID,
SLURM_ARRAY_TASK_ID, SLURM_RESTART_COUNT, SLURMD_NODENAME, SLURM_CPUS_PER_TASK). `requeue()` runs
SLURM's own client command with a timeout and reports (ok, message); it never raises. The decision to
requeue is the policy's (on a stop for SIGUSR1/SIGTERM inside a job, bounded by slurm.max_requeues).
"""
from __future__ import annotations

import os
import re
import subprocess

from supervisor.config.loader import SLURM_STATE_PREFIX
from supervisor.config.loader import slurm_job_spec
from supervisor.config.names import control_chars

REQUEUE_TIMEOUT_S = 30


def in_job(env=None) -> bool:
    return bool((os.environ if env is None else env).get("SLURM_JOB_ID"))


def job_spec(env=None) -> str | None:
    """The id `scontrol requeue` needs: ARRAYJOBID_TASKID for an array task, else the job id."""
    return slurm_job_spec(os.environ if env is None else env)


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


def job_state(spec: str, timeout: float = REQUEUE_TIMEOUT_S) -> str | None:
    """JobState of `scontrol show job SPEC` (e.g. RUNNING, CANCELLED), or None when it cannot be read."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", spec], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in r.stdout.split() if r.returncode == 0 else ():
        if word.startswith("JobState="):
            return word.partition("=")[2]
    return None


def requeue(spec: str, timeout: float = REQUEUE_TIMEOUT_S) -> tuple[str, str]:
    """("requeued" | "failed", message) of `scontrol requeue SPEC`. Whether to requeue at all (SLURM may
    already be ending the job) is the policy's decision on job_state's answer."""
    try:
        r = subprocess.run(["scontrol", "requeue", spec], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return "failed", f"scontrol requeue {spec}: {e}"
    if r.returncode != 0:
        return "failed", f"scontrol requeue {spec} exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}"
    return "requeued", f"scontrol requeue {spec}"


# ---- the sbatch script (`cardiacseg-train slurm-script`) --------------------------------------------------
DEFAULT_EPOCH_S = 300.0  # no epoch measured yet: a 3d_fullres epoch on one GPU takes ~1.5-5 min
SIGNAL_MARGIN_S = 60.0   # start-up of the stop, the requeue, slack in SLURM's signal timing
MIN_SIGNAL_S = 60        # SLURM checks time limits about once a minute: less is not kept anyway


def state_dirs(cfg) -> list:
    """Where state.json may be for this config: the configured state_dir, then the per-job folders a SLURM
    run made below it (`slurm-<job>[_<task>]`), newest first."""
    base = cfg.paths.state_dir
    found = []
    try:
        found = sorted((p for p in base.glob(f"{SLURM_STATE_PREFIX}*") if (p / "state.json").is_file()),
                       key=lambda p: (p / "state.json").stat().st_mtime, reverse=True)
    except OSError:
        pass
    return [base, *found]


def find_state(cfg):
    """(state_dir, data) of the newest state.json that belongs to this job (dataset, fold, ...): the
    configured one first; outside a job, `status` on the login node so finds a SLURM run's state."""
    from supervisor.config import job
    from supervisor.integrations.store import StateStore

    ident = job.job_identity(cfg)
    for d in state_dirs(cfg):
        try:
            data = StateStore(d).read()
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("job") == ident:
            return d, data
    return None, None


def measured_epoch_time(cfg) -> tuple[float | None, str]:
    """Median epoch time of the fold: from state.json (this config's or a SLURM run's), else from the
    fold's training logs; (None, why) when nothing was measured yet."""
    import statistics

    from supervisor.config import job
    from supervisor.core.training_log import replay
    from supervisor.integrations.log_follower import LogFollower

    d, data = find_state(cfg)
    times = [e.get("epoch_time") for e in (data or {}).get("epochs", [])]
    times = [t for t in times if isinstance(t, (int, float)) and t > 0]
    if times:
        return statistics.median(times), f"median of {len(times)} epochs in {d / 'state.json'}"
    try:
        recs = replay(LogFollower(job.fold_dir(cfg)).drain()).ordered()
    except OSError:
        recs = []
    times = [r.epoch_time for r in recs if r.epoch_time]
    if times:
        return statistics.median(times), f"median of {len(times)} epochs in the training logs of {job.fold_dir(cfg)}"
    return None, "no epoch measured yet"


def signal_seconds(epoch_s: float, stop_timeout_s: float, margin_s: float = SIGNAL_MARGIN_S) -> int:
    """How long before the time limit SIGUSR1 must come: finish the running epoch (its checkpoint), stop the
    trainer (at most stop.timeout_seconds), requeue; at least MIN_SIGNAL_S."""
    import math

    return max(MIN_SIGNAL_S, math.ceil(epoch_s + stop_timeout_s + margin_s))


def parse_time(text: str) -> int | None:
    """SLURM's --time formats to seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None if unparsable."""
    try:
        days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
        parts = [int(x) for x in rest.split(":")]
        d = int(days)
    except ValueError:
        return None
    if "-" in text:
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    elif len(parts) == 3:
        h, m, s = parts
    else:
        return None
    return ((d * 24 + h) * 60 + m) * 60 + s


class ScriptError(ValueError):
    """A value `slurm-script` cannot write into the script as it is; str() names it and says why."""


_HETJOB = re.compile(r"(?i)(het|pack)(j)(ob)")


def _plain(what: str, value: str) -> str:
    """A value for a comment or the exec line: refused when it holds a control character (a newline would end
    the comment, and what follows would be read as another #SBATCH line by sbatch or a command by bash)."""
    if (why := control_chars(value)) is not None:
        raise ScriptError(f"{what} {value!r} cannot be written into the sbatch script: expected {why}")
    return value


def sbatch_word(what: str, value: str) -> str:
    """`value` as one argument of an #SBATCH line, read back by sbatch exactly as given.

    sbatch parses the #SBATCH lines itself (bash sees comments), up to the first line that is not a comment:
    a newline ends the line, `"` quotes, `\\` escapes the next character, an unquoted `#` starts a comment
    (quoted too, in older versions), and a line with `hetjob` or `packjob` anywhere in its raw text, in any
    case, starts the next component of a heterogeneous job. So control characters are refused (a newline
    cannot be written at all), the value is double-quoted with `\\`, `"` and `#` escaped, and the `j` of
    `hetjob`/`packjob` is escaped too: the raw line no longer contains the word, and sbatch reads `\\j` as `j`."""
    v = re.sub(r'([\\"#])', r"\\\1", _plain(what, value))
    return '"' + _HETJOB.sub(r"\1\\\2\3", v) + '"'


def output_pattern(folder, name: str) -> str:
    """--output's value: SLURM expands `%` patterns in it (so a `%` of the folder is written `%%`), and a
    backslash anywhere turns every pattern off (`%j` would stay `%j`): such a folder is refused."""
    folder = _plain("the config's folder", str(folder))
    if "\\" in folder:
        raise ScriptError(f"the config's folder {folder!r} holds a backslash: SLURM would then not expand "
                          "%j/%A/%a in --output (every run would write one literal file); move the config")
    return folder.replace("%", "%%") + "/" + name


def sbatch_script(cfg, *, command: list[str], partition=None, time=None, gpus=None, cpus_per_task=None,
                  mem=None, folds=None) -> tuple[str, list[str]]:
    """(the sbatch script, warnings); raises ScriptError for a value it cannot write safely. The script
    `exec`s the supervisor so that SIGUSR1 from `--signal=B:USR1@S` (B: the batch shell only) and SLURM's
    SIGTERM reach it. Every #SBATCH line comes before the first command (sbatch stops reading there); their
    values are quoted for sbatch (`sbatch_word`), the exec line for bash (shlex.quote), and comments hold no
    control characters: no config string can end the #SBATCH block or add a command."""
    import shlex

    epoch_s, source = measured_epoch_time(cfg)
    warnings = []
    if epoch_s is None:
        epoch_s, source = DEFAULT_EPOCH_S, f"no epoch measured yet: default {DEFAULT_EPOCH_S:g} s"
    sig_s = signal_seconds(epoch_s, cfg.stop.timeout_seconds)
    if gpus is None:
        gpus = cfg.training.num_gpus if cfg.training.device == "cuda" else 0
    folds = list(folds or [])
    t = cfg.training
    name = sbatch_word("the job name", f"cardiacseg-{t.dataset}-{t.configuration}")
    config = _plain("the config path", str(cfg.path))
    lines = ["#!/bin/bash",
             f"# generated by `cardiacseg-train slurm-script` for {config}",
             f"# epoch time {epoch_s:.1f} s ({_plain('the epoch time source', source)}); SIGUSR1 {sig_s} s "
             "before the time limit =",
             f"# epoch + stop.timeout_seconds ({cfg.stop.timeout_seconds:g} s) + margin ({SIGNAL_MARGIN_S:g} s)",
             f"#SBATCH --job-name={name}",
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append",
             f"#SBATCH --signal=B:USR1@{sig_s}"]
    if partition:
        lines.append(f"#SBATCH --partition={sbatch_word('--partition', partition)}")
    if time:
        lines.append(f"#SBATCH --time={sbatch_word('--time', time)}")
        limit = parse_time(time)
        if limit is not None and limit <= sig_s:
            warnings.append(f"--time {time} is not longer than the stop signal's lead ({sig_s} s): SLURM sends "
                            "SIGUSR1 at once, and every run stops and requeues before it trains an epoch")
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{int(gpus)}")
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={int(cpus_per_task)}")
    if mem:
        lines.append(f"#SBATCH --mem={sbatch_word('--mem', mem)}")
    if len(folds) > 1 or (folds and folds != [t.fold]):
        # sbatch takes numbers only: a caller expands `all` first (config/folds.expand)
        lines.append(f"#SBATCH --array={','.join(str(int(f)) for f in folds)}")
        out, fold_arg = "slurm-%A_%a.out", ' --fold "$SLURM_ARRAY_TASK_ID"'
    else:
        out, fold_arg = "slurm-%j.out", ""
    lines.append("#SBATCH --output=" + sbatch_word("the config's folder", output_pattern(cfg.path.parent, out)))
    lines += ["",
              "# state: <config dir>/state/slurm-<job>[_<task>] unless [paths] state_dir says otherwise; a requeued",
              "# job (same id) finds it and resumes with --c. exec: the signals must reach the supervisor.",
              "exec " + " ".join(shlex.quote(_plain("the interpreter", a)) for a in command) + " run --config "
              + shlex.quote(config) + fold_arg, ""]
    return "\n".join(lines), warnings


def explicit_state_dir(cfg, env=None) -> str | None:
    """The state_dir the config file or $STATE_DIRECTORY sets (None: the per-job default applies)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(cfg.path.read_text())
    except (OSError, ValueError):
        return None
    paths = raw.get("paths") if isinstance(raw.get("paths"), dict) else {}
    return paths.get("state_dir") or env.get("STATE_DIRECTORY") or None
