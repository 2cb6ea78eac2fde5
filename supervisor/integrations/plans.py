"""The batch size in nnU-Net's plans file, and the OOM step-down sequence.

How it works
- nnU-Net reads `$nnUNet_preprocessed/<dataset>/<plans>.json` -> configurations.<cfg>.batch_size at every
  start, so editing it before a `--c` restart changes the batch size of any training command (a custom
  script too) without touching the results folder.
- A configuration may `inherits_from` another and have no batch_size of its own: reading follows the
  chain; writing sets batch_size on the configuration itself, so the parent (and its other children)
  keep theirs.
- `set_batch_size` re-serialises the document the way nnU-Net's save_json does (json, indent=4, key order
  kept, floats round-trip exactly), so every other key keeps its value; the original file is copied once
  to `<name>.json.cardiacseg-backup` (never overwritten later) and the new one is written atomically
  (store.atomic_write: temp + fsync + rename).
- The plans file belongs to the user, not to the supervisor (which may run as root): the new file and the
  backup keep its owner, group and mode, and a symlinked plans file stays a symlink: the write goes to
  the link's target, atomically in the target's folder. The backup lies next to the configured path and
  is made complete under a temp name, then hard-linked into place, so it is never half a file and never
  replaces one already there.
- `fit_batch_size` writes the batch-size fit's choice (up or down) under the same lock, only while the
  file still says what the fit started from.
- `next_batch_size` is the pure step function: subtract N or multiply by a factor (rounded down), never
  below the minimum; None when already at the minimum.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from supervisor.core.criteria import next_batch_size, step_sequence  # noqa: F401  (pure; used by the policy)
from supervisor.config import job
from supervisor.config.loader import ConfigError
from supervisor.integrations.store import atomic_write, fsync_dir, keep_owner_and_mode, temp_beside

BACKUP_SUFFIX = ".cardiacseg-backup"


class PlansError(Exception):
    """A plans file that cannot be used; str() names the file and key."""


def _load(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise PlansError(f"{path}: plans file not found (run nnUNetv2_plan_and_preprocess, or check "
                         "[paths].preprocessed / [training].plans)") from None
    except OSError as e:
        raise PlansError(f"{path}: cannot read: {e.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise PlansError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("configurations"), dict):
        raise PlansError(f"{path}: key 'configurations': expected an object of configurations")
    return doc


def load(path: Path) -> dict:
    """The plans file as a document with a 'configurations' object; PlansError says what is wrong."""
    return _load(path)


def read_batch_size(path: Path, configuration: str) -> int:
    doc = _load(path)
    confs = doc["configurations"]
    name, seen = configuration, []
    while True:
        conf = confs.get(name)
        if not isinstance(conf, dict):
            where = f"configurations.{name}" + (f" (inherited by {seen[0]})" if seen else "")
            raise PlansError(f"{path}: key '{where}' not found (has: {', '.join(confs)})")
        if "batch_size" in conf:
            bs = conf["batch_size"]
            if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
                raise PlansError(f"{path}: key 'configurations.{name}.batch_size': expected an integer "
                                 f">= 1, got {bs!r}")
            return bs
        seen.append(name)
        parent = conf.get("inherits_from")
        if not parent or parent in seen:
            raise PlansError(f"{path}: key 'configurations.{configuration}.batch_size' not found "
                             "(nor in any configuration it inherits from)")
        name = parent


def configuration(path: Path, name: str) -> dict:
    """The plans' configuration `name` with its `inherits_from` chain merged, as nnU-Net's PlansManager
    does (data_identifier, patch_size, previous_stage, ...); PlansError names what is missing. The merge is
    core/batch_fit.configuration's (one declaration of how nnU-Net reads a configuration)."""
    from supervisor.core import batch_fit

    try:
        return batch_fit.configuration(_load(path), name)
    except batch_fit.FitInputError as e:
        raise PlansError(f"{path}: {e}") from None


def set_batch_size(path: Path, configuration: str, new: int) -> tuple[int, Path]:
    """Write `new` for `configuration`; returns (old value, backup path). Atomic; backs up once."""
    path = Path(path)
    old = read_batch_size(path, configuration)
    doc = _load(path)
    doc["configurations"][configuration]["batch_size"] = int(new)
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if not os.path.lexists(backup):
        _backup(path, backup)
    atomic_write(path, json.dumps(doc, indent=4).encode(), follow_symlink=True)
    return old, backup


def _backup(path: Path, backup: Path) -> None:
    """Copy the plans file (through a link) to `backup` with its owner, group, mode and times; no clobber."""
    with open(path, "rb") as src:
        data, st = src.read(), os.fstat(src.fileno())
    fd, tmp = temp_beside(backup.parent, backup.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            keep_owner_and_mode(fh.fileno(), st)
            fh.write(data)
            fh.flush()
            os.utime(fh.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
            os.fsync(fh.fileno())
        try:
            os.link(tmp, backup)  # fails if a backup appeared meanwhile: the first one is the original
        except FileExistsError:
            pass
        except OSError as e:  # a file system without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) or os.path.lexists(backup):
                raise
            os.rename(tmp, backup)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(backup.parent)


def plan_batch_size(path: Path, configuration: str) -> int | None:
    """The plan's batch size (inherits_from followed), None when the file cannot tell."""
    try:
        return read_batch_size(path, configuration)
    except PlansError:
        return None


def lower_batch_size(path: Path, configuration: str, new: int) -> tuple[int, int, Path | None]:
    """Lower the batch size to `new`, never raise it: (value found, value now in force, backup).

    The folds of a queue share one plans file: under an flock on `<plans>.json.cardiacseg-lock`, the file
    is re-read and only a smaller value is written, so a job that saw an older, larger size cannot undo
    another job's step-down, and two step-downs at once cannot lose one."""
    with _plans_lock(path):
        current = read_batch_size(path, configuration)
        if current <= new:
            return current, current, None
        old, backup = set_batch_size(path, configuration, new)
        return old, new, backup


def fit_batch_size(path: Path, configuration: str, expected: int, new: int) -> tuple[int, int, Path | None]:
    """Write the fit's choice, up or down: (value found, value now in force, backup). Under the same lock as
    the step-down, and only while the file still says `expected` (the size the fit started from): a
    step-down or another job's fit that changed the shared plans meanwhile stands."""
    with _plans_lock(path):
        current = read_batch_size(path, configuration)
        if current != expected or current == new:
            return current, current, None
        old, backup = set_batch_size(path, configuration, new)
        return old, new, backup


@contextlib.contextmanager
def _plans_lock(path: Path):
    """flock on `<plans>.json.cardiacseg-lock`: the folds of a queue share one plans file."""
    import fcntl

    lock = Path(path).with_name(Path(path).name + ".cardiacseg-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def dataset_problems(cfg) -> list[str]:
    """What stops nnU-Net from finding the dataset, plans or configuration ([] when they are fine).
    Shared by `check` and `run` (startup_batch_size), so both name the same cause."""
    name = job.dataset_name(cfg)
    if not cfg.paths.preprocessed.is_dir():
        return [f"paths.preprocessed: {cfg.paths.preprocessed} is not a directory"]
    if not (cfg.paths.preprocessed / name).is_dir():
        return [f"training.dataset: {cfg.training.dataset!r} not found in {cfg.paths.preprocessed} "
                "(run nnUNetv2_plan_and_preprocess first, or check [paths].preprocessed)"]
    pf = job.plans_file(cfg)
    try:
        confs = json.loads(pf.read_text())["configurations"]
        names = list(confs)
    except FileNotFoundError:
        return [f"training.plans: {pf} does not exist (plans in that folder: "
                f"{', '.join(p.stem for p in pf.parent.glob('*Plans*.json')) or 'none'})"]
    except OSError as e:
        return [f"training.plans: cannot read {pf}: {e.strerror}"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"training.plans: {pf} is not a valid plans file (key 'configurations': {e})"]
    if cfg.training.configuration not in confs:
        return [f"training.configuration: {cfg.training.configuration!r} is not in {pf} (has: {', '.join(names)})"]
    return []


def startup_batch_size(cfg) -> int | None:
    """The plan's batch size, validated before anything starts (ConfigError names the file and key).

    A missing dataset, plans file or configuration is named as such, with the words `check` uses
    (dataset_problems), whether or not [oom] needs the batch size: the trainer would only fail on it.
    """
    problems = dataset_problems(cfg)
    if problems:
        raise ConfigError(cfg.path, problems)
    if not cfg.oom.enabled and not cfg.tune.batch_size_fit:
        return None
    path = job.plans_file(cfg)
    try:
        bs = read_batch_size(path, cfg.training.configuration)
    except PlansError as e:
        needs = "[oom]" if cfg.oom.enabled else "[tune] batch_size_fit"
        raise ConfigError(cfg.path, [f"{needs} needs the batch size from the plans file: {e}"]) from None
    if cfg.oom.enabled and cfg.oom.min_batch_size > bs:
        raise ConfigError(cfg.path, [
            f"oom.min_batch_size: expected <= the plan's batch size {bs} ({path}: "
            f"configurations.{cfg.training.configuration}.batch_size), got {cfg.oom.min_batch_size}"])
    return bs
