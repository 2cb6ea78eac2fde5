"""Where `unpack` writes, checked before it writes: inside the roots, room for it, nobody training there.

How it works
- `check_destinations`: every listed file must land inside its root, even through links already there
  (the deepest existing ancestor, resolved); a root the archive needs but nobody gave is named.
- `check_space`: staging holds every file before anything is placed, on the filesystem of its root: the
  listed sizes per filesystem must fit in its free space (statvfs), so a manifest that lists more than
  fits (a member bomb of declared terabytes) is refused before a byte is written.
- Nobody training there, as `run` refuses a second trainer (and reusing what it uses): with `--config`
  the job's state directory lock (store.Lock) must be free: `hold_lock` takes it for the whole unpack,
  so a supervisor started meanwhile stops at its own lock (exit 4) instead of training on half-placed
  files; `--dry-run` only probes it (Lock.holder). And no nnU-Net trainer may run on a fold folder the
  archive writes into (other_trainers.find, for each `<dataset>/<trainer>__<plans>__<configuration>/
  fold_<f>` among the listed paths, with our results root): `trainers_here`, called before staging and
  again before placing. Each refusal is Refused naming what runs.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

from supervisor.commands import pack_manifest as mf
from supervisor.integrations import other_trainers
from supervisor.integrations.store import Lock, LockedError


class Refused(Exception):
    """The destination is not fit for this archive right now (busy, too small): nothing is placed."""


def inside(path: Path, root: Path) -> bool:
    """Does path (its deepest existing ancestor resolved through links) stay inside root?"""
    if not os.path.lexists(root):
        return True  # nothing below it exists yet: everything will be made by us, as folders
    real_root = os.path.realpath(root)
    p = path
    while not os.path.lexists(p) and p != root:
        p = p.parent
    real = os.path.realpath(p)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def check_destinations(doc: dict, roots: dict) -> None:
    for f in doc["files"]:
        root = roots.get(f["root"])
        if root is None:
            var = {"raw": "--to-raw (or nnUNet_raw)", "preprocessed": "--to-preprocessed",
                   "results": "--to-results"}[f["root"]]
            raise mf.BadArchive(f"the archive holds {f['root']} files ({f['path']}, ...) but no {f['root']} "
                                f"folder was given: use --config or {var}")
        dest = Path(root) / f["path"]
        if not inside(dest.parent, Path(root)):
            raise mf.BadArchive(f"{f['root']}/{f['path']}: would be written outside {root} through a link "
                                "already there; refused")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_space(doc: dict, roots: dict) -> None:
    need: dict[int, list] = {}  # st_dev -> [bytes, a folder on it]
    for f in doc["files"]:
        where = _existing(Path(roots[f["root"]]))
        need.setdefault(os.stat(where).st_dev, [0, where])[0] += f["size"]
    for size, where in need.values():
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise Refused(f"its files take {size / 1e9:.2f} GB, the filesystem of {where} has "
                          f"{free / 1e9:.2f} GB free")


def hold_lock(cfg, dry_run: bool) -> Lock | None:
    """The job's state directory lock, taken (None for a dry run, or when no supervisor ever ran there);
    Refused when a supervisor holds it."""
    if cfg is None:
        return None
    state_dir = Path(cfg.paths.state_dir)
    if dry_run or not state_dir.is_dir():
        lock, holder = None, Lock.holder(state_dir)
    else:
        lock, holder = Lock(state_dir), None
        try:
            lock.acquire()
        except LockedError as e:
            lock, holder = None, e.holder
    if holder:
        raise Refused(f"a cardiacseg-train supervisor ({holder}) is running this job (state directory "
                      f"{state_dir}): unpacking under it would change its files while it trains; stop it first")
    return lock


def _fold_jobs(doc: dict) -> set[tuple[str, str, str, str, str]]:
    """(dataset, trainer, plans, configuration, fold) of every fold folder the archive writes into."""
    paths = [f["path"] for f in doc["files"] if f["root"] == "results"] + [f["path"] + "/" for f in doc["folds"]]
    out = set()
    for path in paths:
        parts = path.split("/")
        if len(parts) < 4 or not parts[2].startswith("fold_") or len(names := parts[1].split("__")) != 3:
            continue
        out.add((parts[0], *names, parts[2][len("fold_"):]))
    return out


def trainers_here(doc: dict, roots: dict) -> None:
    """Refused when an nnU-Net trainer runs on a fold folder the archive writes into."""
    results = roots.get("results")
    if results is None:
        return
    for ds, trainer, plans, conf, fold in sorted(_fold_jobs(doc)):
        cfg = SimpleNamespace(
            training=SimpleNamespace(dataset=ds, configuration=conf, fold=fold, trainer=trainer, plans=plans),
            paths=SimpleNamespace(raw=roots.get("raw"), preprocessed=roots.get("preprocessed"), results=results,
                                  state_dir=None))
        if found := other_trainers.find(cfg):
            raise Refused(f"another trainer is training {ds}/{trainer}__{plans}__{conf}/fold_{fold} right now "
                          f"({other_trainers.describe(found)}): unpacking would replace its checkpoints under "
                          "it; stop it first")
