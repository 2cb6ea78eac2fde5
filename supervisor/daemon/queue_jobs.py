"""A queue's jobs on disk and as configs: what the queue master (daemon/queue_master.py), `run`, `check` and
`status` need to know about them, measured, never decided.

How it works
- Each job (configuration x fold) is an ordinary single-job supervisor, `cardiacseg-train run` with
  CARDIACSEG_QUEUE_JOB (ENV) naming its configuration, fold, state directory
  (<state_dir>/jobs/<configuration>-fold_<f>) and GPU slot; `job_config(cfg, spec)` applies it.
- `problems(cfg)` lists what makes the queue impossible (a configuration or fold the plans/splits do not
  have, a GPU listed twice, a cascade without its 3d_lowres fold in the queue or on disk);
  `cascade_findings` the cascade stages' input (core/cascade.py); `version_problems` the known-bad
  versions (core/known_bad.py) for every job: `run` exits 2 with all of them.
- What a job's state.json says, read for the queue's policy: done (`already_done`), how it ended
  (`exited`: outcome, unhealthy GPUs, a started epoch), past data loading (`past_data_loading`), and
  whether its supervisor still runs (`still_running`: its lock is held). `data_group` (the preprocessed
  folder a job's trainer reads) and `slot_gpus` (each slot's NVML indices) feed the policy's gates.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import psutil

from supervisor.config import job as jobmod
from supervisor.core import queue_policy as qp
from supervisor.core.queue_policy import Job, jobs
from supervisor.integrations import cascade, environment
from supervisor.integrations.plans import PlansError, configuration
from supervisor.integrations.store import Lock

ENV = "CARDIACSEG_QUEUE_JOB"


def state_dir(cfg, j: Job) -> Path:
    """Each job's own state directory below the queue's."""
    return Path(cfg.paths.state_dir) / "jobs" / f"{j.configuration}-fold_{j.fold}"


def job_config(cfg, spec: dict):
    """The single-job config a queue child runs with (from CARDIACSEG_QUEUE_JOB)."""
    env = dict(cfg.environment)
    if spec.get("gpu") is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(spec["gpu"])
    training = dataclasses.replace(cfg.training, configuration=spec["configuration"], fold=spec["fold"])
    paths = dataclasses.replace(cfg.paths, state_dir=Path(spec["state_dir"]))
    queue = dataclasses.replace(cfg.queue, folds=(), configurations=(), gpus=())
    return cfg.replace(training=training, paths=paths, environment=env, queue=queue)


def _with(cfg, j: Job):
    return cfg.replace(training=dataclasses.replace(cfg.training, configuration=j.configuration, fold=j.fold))


def job_configs(cfg) -> list[tuple[str, object]]:
    """(label, the job's config) for each job of a queue ("3d_fullres fold 1: "); [("", cfg)] for one job."""
    if not qp.is_queue(cfg):
        return [("", cfg)]
    return [(f"{j.configuration} fold {j.fold}: ", _with(cfg, j)) for j in jobs(cfg)]


def problems(cfg) -> list[str]:
    out = []
    gpus = [str(g) for g in cfg.queue.gpus]
    devices = [d.strip() for g in gpus for d in g.split(",")]  # a slot may be several GPUs ("0,1")
    if len(set(devices)) != len(devices):
        twice = sorted({d for d in devices if devices.count(d) > 1})
        out.append(f"queue.gpus: expected each GPU in one slot only, got {gpus} (GPU {', '.join(twice)} in "
                   "more than one): two jobs would train on one GPU")
    try:
        plans = json.loads(jobmod.plans_file(cfg).read_text())
        confs = plans["configurations"]
    except (OSError, ValueError, KeyError, TypeError):
        confs = None  # check/run name the plans problem itself
    if cfg.queue.folds:
        try:
            jobmod.expand_folds(cfg, list(cfg.queue.folds))
        except ValueError as e:
            out.append(f"queue.folds: {e}")
    all_jobs = jobs(cfg)
    for j in all_jobs:
        if confs is not None and j.configuration not in confs:
            out.append(f"queue.configurations: {j.configuration!r} is not in {jobmod.plans_file(cfg)} "
                       f"(has: {', '.join(confs)})")
        if j.configuration == "3d_cascade_fullres":
            low = Job("3d_lowres", j.fold)
            on_disk = (jobmod.fold_dir(_with(cfg, low)) / "checkpoint_final.pth").is_file()
            if low not in all_jobs and not on_disk:
                out.append(f"queue.configurations: 3d_cascade_fullres fold {j.fold} needs 3d_lowres fold {j.fold}: "
                           "add 3d_lowres to the queue or train it first")
    return sorted(set(out), key=out.index)


def cascade_findings(cfg) -> list[tuple[str, str]]:
    """(level, text) for each cascade job (integrations/cascade.py, judged by core/cascade.py): the previous
    stage's prediction of every training case; in a queue, what its previous-stage folds will still write
    counts as coming (a cascade fold starts only once every one of them is done: queue_policy.schedule)."""
    out, all_jobs = [], jobs(cfg) if qp.is_queue(cfg) else []
    for _label, jcfg in job_configs(cfg):
        prev = cascade.previous_stage(jcfg)
        queued = frozenset(j.fold for j in all_jobs if j.configuration == prev)
        if (f := cascade.finding(jcfg, queued)) is not None:
            out.append(f)
    return out


def start_problems(cfg, log) -> tuple[list[str], object]:
    """Everything that refuses a queue's start (`run` exits 2 with all of it), and the trainer environment's
    versions (measured once for every job; None when the probe could not tell)."""
    from supervisor.integrations.plans import dataset_problems
    out = dataset_problems(cfg) + problems(cfg)
    out += [text for level, text in cascade_findings(cfg) if level == "fatal"]
    versions, why = environment.measure(cfg)
    return out + version_problems(cfg, versions, why, log), versions


def version_problems(cfg, versions, why: str, log) -> list[str]:
    """The known-bad versions (core/known_bad.py) fatal for any job of the queue, each once (labelled when
    only some jobs have it: a 2d configuration, one job's numpy-2 checkpoint); warnings logged."""
    if versions is None:
        log.warning("versions_unchecked", why=why, effect="starting; known-bad versions not judged")
        return []
    per_job = [(label, environment.before_start(jcfg, log, versions=versions)) for label, jcfg in job_configs(cfg)]
    common = [t for t in per_job[0][1] if all(t in found for _label, found in per_job)]
    return common + [label + t for label, found in per_job for t in found if t not in common]


def data_group(cfg, j: Job) -> str | None:
    """The preprocessed folder the job's trainer unpacks and reads (its configuration's data_identifier)."""
    try:
        ident = configuration(jobmod.plans_file(cfg), j.configuration).get("data_identifier")
    except PlansError:
        return None
    return ident if isinstance(ident, str) else None


def npz_data(cfg, jobs) -> bool:
    """Does a job's preprocessed folder hold .npz cases (written by nnunetv2 before 2.6)? Every trainer then
    converts them to .npy at start, even nnunetv2 2.6+. Looks at one entry per folder: cheap, never fails."""
    import itertools
    for ident in {g for j in jobs if (g := data_group(cfg, j))}:
        try:
            folder = cfg.paths.preprocessed / jobmod.dataset_name(cfg) / ident
            if any(p.suffix == ".npz" for p in itertools.islice(folder.iterdir(), 64)):
                return True
        except (OSError, ValueError):
            continue
    return False


def slot_gpus(cfg, slots) -> tuple:
    """((slot, (NVML index, ...)), ...) as a job's supervisor maps its CUDA_VISIBLE_DEVICES (Nvml.select);
    () without NVML (then no job can report an unhealthy GPU either)."""
    from supervisor.integrations.nvml import Nvml
    nv = Nvml.open()
    if nv is None:
        return ()
    out = []
    try:
        for s in slots:
            visible = str(s) if s is not None else jobmod.build_env(cfg).get("CUDA_VISIBLE_DEVICES")
            idx, why = nv.select(visible, cfg.training.num_gpus)
            if why is None:
                out.append((s, tuple(idx)))
    finally:
        nv.close()
    return tuple(out)


def concrete(cfg):
    """The queue as every command sees it: `all` in [queue] folds is every fold of splits_final.json, and a
    queue of one job is that job (trained, and shown, as [training] naming it would be). A fold the split
    lacks, or one given twice, is a ConfigError listing every problem of the queue at once."""
    from supervisor.config.loader import ConfigError

    q = cfg.queue
    if q.folds:
        try:
            folds = tuple(jobmod.expand_folds(cfg, list(q.folds)))
        except ValueError:
            raise ConfigError(cfg.path, problems(cfg)) from None
        cfg = cfg.replace(queue=dataclasses.replace(q, folds=folds))
    if (q.folds or q.configurations or q.gpus) and not qp.is_queue(cfg):
        env = dict(cfg.environment)
        if q.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(q.gpus[0])
        cfg = _with(cfg, jobs(cfg)[0]).replace(
            environment=env, queue=dataclasses.replace(cfg.queue, folds=(), configurations=(), gpus=()))
    return cfg


def read_state(cfg, j: Job) -> dict:
    """The job's state.json, {} when there is none or it is unreadable."""
    try:
        data = json.loads((state_dir(cfg, j) / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_sup(cfg, j: Job) -> dict:
    """The job's durable record ("sup" of its state.json), {} when there is none or it is unreadable."""
    sup = read_state(cfg, j).get("sup")
    return sup if isinstance(sup, dict) else {}


def already_done(cfg, j: Job) -> bool:
    return read_sup(cfg, j).get("outcome") in qp.DONE_OUTCOMES


def past_data_loading(data: dict) -> bool:
    """A state.json whose attempts show a started epoch (the trainer got past unpacking its data)."""
    attempts = data.get("attempts")
    return (isinstance(attempts, list) and any(isinstance(a, dict) and a.get("epoch_seen") for a in attempts)) \
        or (isinstance(data.get("epoch_count"), int) and data["epoch_count"] > 0)


def exited(cfg, j: Job, code: int | None) -> qp.JobExited:
    """What the job's state.json says about how it ended: outcome, unhealthy GPUs, a started epoch. A value of
    the wrong type counts as absent (a GPU index must be an int >= 0)."""
    data = read_state(cfg, j)
    sup = data.get("sup") if isinstance(data.get("sup"), dict) else {}
    gpus = sup.get("unhealthy_gpus") if isinstance(sup.get("unhealthy_gpus"), list) else []
    outcome = sup.get("outcome") if isinstance(sup.get("outcome"), str) else None
    return qp.JobExited(j.key, code, outcome in qp.DONE_OUTCOMES, outcome,
                        tuple(sorted({g for g in gpus if isinstance(g, int) and not isinstance(g, bool) and g >= 0})),
                        past_data_loading(data))


def still_running(cfg, j: Job) -> tuple[int, object] | None:
    """(pid, GPU slot) of this job's supervisor when one still runs (it holds the job's lock), e.g. after
    the master itself was killed; the slot is the one in its CARDIACSEG_QUEUE_JOB."""
    holder = Lock.holder(state_dir(cfg, j))
    if not holder or not holder.startswith("pid ") or not holder[4:].isdigit():
        return None
    pid = int(holder[4:])
    try:
        spec = json.loads(psutil.Process(pid).environ().get(ENV, "null")) or {}
    except (psutil.Error, OSError, ValueError):
        spec = {}
    return pid, spec.get("gpu")


def job_line(cfg, j: Job) -> str:
    try:
        return json.loads((state_dir(cfg, j) / "state.json").read_text()).get("status_line") or ""
    except (OSError, ValueError):
        return ""
