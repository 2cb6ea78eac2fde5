"""A cascade stage's input on disk: is the previous stage's prediction of every training case there? What
`check`, `run`'s start-up, the queue's start and `pack` ask (the judgement is core/cascade.py's).

How it works: the plans say whether the configuration is a cascade stage (`previous_stage`, inherits_from
followed, as nnU-Net's ConfigurationManager); the folder is the one nnUNetTrainer reads,
`<results>/<dataset>/<trainer>__<plans>__<previous>/predicted_next_stage/<configuration>/`. The cases it
must hold are the fold's train + val cases of splits_final.json (every case of the configuration's
preprocessed data for fold "all" or without a split); a case counts when a non-empty file of the kind the
configuration's data needs is there (.b2nd for blosc2 data, .npz or .npy for numpy data), links followed
as nnU-Net follows them (a linked folder is fine, a dangling link is said).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from supervisor.config import job
from supervisor.core import cascade
from supervisor.integrations.plans import PlansError, configuration

NNUNET_DEFAULT_TRAINER, NNUNET_DEFAULT_PLANS = "nnUNetTrainer", "nnUNetPlans"


def previous_stage(cfg, name: str | None = None) -> str | None:
    """The plans' previous_stage of the configuration (None: not a cascade stage, or no readable plans)."""
    try:
        prev = configuration(job.plans_file(cfg), name or cfg.training.configuration).get("previous_stage")
    except PlansError:
        return None
    return prev if isinstance(prev, str) and prev else None


def stage_dir(cfg, configuration_name: str) -> Path:
    t = cfg.training
    return Path(cfg.paths.results) / job.dataset_name(cfg) / f"{t.trainer}__{t.plans}__{configuration_name}"


def predictions_dir(cfg, previous: str) -> Path:
    return stage_dir(cfg, previous) / "predicted_next_stage" / cfg.training.configuration


def _data(cfg) -> tuple[list[str], tuple[str, ...]]:
    """The configuration's preprocessed case identifiers, and the prediction endings its loader reads."""
    try:
        ident = configuration(job.plans_file(cfg), cfg.training.configuration).get("data_identifier")
        names = os.listdir(Path(cfg.paths.preprocessed) / job.dataset_name(cfg) / str(ident))
    except (PlansError, OSError):
        return [], (".b2nd", ".npz", ".npy")
    b2nd = [n[:-5] for n in names if n.endswith(".b2nd") and not n.endswith("_seg.b2nd")]
    if b2nd:
        return b2nd, (".b2nd",)
    return [n[:-4] for n in names if n.endswith(".npz")], (".npz", ".npy")


def _folder_state(folder: Path) -> str:
    if folder.is_dir():
        return "ok"
    if folder.is_symlink():
        return f"a dangling link to {os.readlink(folder)}"
    return "not a folder" if folder.exists() else "missing"


def _present(folder: Path, endings: tuple[str, ...]) -> tuple[frozenset, frozenset]:
    present, empty = set(), set()
    try:
        names = os.listdir(folder)
    except OSError:
        return frozenset(), frozenset()
    for n in names:
        end = next((e for e in endings if n.endswith(e)), None)
        if end is None or n.startswith("."):
            continue
        try:
            st = os.stat(folder / n)  # follows links, as nnU-Net's open does
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        (present if st.st_size > 0 else empty).add(n[:-len(end)])
    return frozenset(present), frozenset(empty - present)


def measure(cfg, queued=frozenset()) -> cascade.Input | None:
    """What is on disk for this (cascade) job; None when its configuration is not a cascade stage."""
    prev = previous_stage(cfg)
    if prev is None:
        return None
    try:
        splits = json.loads((job.plans_file(cfg).parent / job.SPLITS_FILE).read_text())
    except (OSError, ValueError):
        splits = None
    identifiers, endings = _data(cfg)
    folder = predictions_dir(cfg, prev)
    present, empty = _present(folder, endings)
    vf = cascade.val_folds(splits)
    t = cfg.training
    trained = frozenset(k for k in set(vf.values())
                        if (stage_dir(cfg, prev) / f"fold_{k}" / "checkpoint_final.pth").is_file())
    tr_args = ((f" -tr {t.trainer}" if t.trainer != NNUNET_DEFAULT_TRAINER else "")
               + (f" -p {t.plans}" if t.plans != NNUNET_DEFAULT_PLANS else ""))
    return cascade.Input(dataset=job.dataset_name(cfg), configuration=t.configuration, fold=t.fold, previous=prev,
                         folder=str(folder), folder_state=_folder_state(folder),
                         required=tuple(cascade.required(splits, t.fold, identifiers)), present=present,
                         empty=empty, val_fold=tuple(sorted(vf.items())), trained=trained,
                         queued=frozenset(queued), tr_args=tr_args, has_split=isinstance(splits, list))


def finding(cfg, queued=frozenset()) -> tuple[str, str] | None:
    """(level, text) for this job's cascade input, None when it is not a cascade stage."""
    x = measure(cfg, queued)
    return None if x is None else cascade.judge(x)


def before_start(cfg) -> list[str]:
    """For `run`: the problem (a ConfigError's line) when the cascade's input is incomplete, else []."""
    f = finding(cfg)
    return [f[1]] if f is not None and f[0] == "fatal" else []
