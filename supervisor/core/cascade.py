"""A cascade stage's input: the previous stage's prediction of every case it trains on (pure: no I/O).

What nnU-Net does (nnunetv2 2.8.1, nnUNetTrainer): a configuration with `previous_stage` in the plans
(3d_cascade_fullres: 3d_lowres) loads, for every training AND validation case of its fold,
`$nnUNet_results/<dataset>/<trainer>__<plans>__<previous stage>/predicted_next_stage/<configuration>/<case>`
(.b2nd for blosc2 data, .npz/.npy for numpy data). Those files are written only by the previous stage's
validation (perform_actual_validation, at the end of training or with `--val`), each fold for its own
validation cases: a lowres fold trained but not validated, or killed during its validation, leaves the
folder incomplete, and the cascade then dies in its data loader (a worker's FileNotFoundError).

- `required(splits, fold, identifiers)`: the cases fold `fold` trains and validates on, as nnU-Net's
  do_split picks them (fold "all", no split file, or a fold the split lacks: every identifier).
- `judge(...)`: the missing ones against what is on disk and what a queue will still produce; the
  finding names a few cases, the count, and the fix per lowres fold: `--val --npz` where that fold has
  checkpoint_final.pth, else train it.
"""
from __future__ import annotations

from dataclasses import dataclass

SHOWN = 3  # cases named in a message; the rest are counted


@dataclass(frozen=True)
class Input:
    """What was measured for one cascade job."""
    dataset: str
    configuration: str            # the cascade stage, e.g. 3d_cascade_fullres
    fold: object
    previous: str                 # its previous stage, e.g. 3d_lowres
    folder: str                   # the predicted_next_stage/<configuration> folder
    folder_state: str             # "ok" | "missing" | "not a folder" | "dangling link to X"
    required: tuple               # the cases the fold trains and validates on
    present: frozenset            # cases with a non-empty prediction file of the right kind
    empty: frozenset = frozenset()  # cases whose file is there but empty (an export cut short)
    val_fold: tuple = ()          # (case, fold of the split that validates it)
    trained: frozenset = frozenset()  # previous-stage folds with checkpoint_final.pth
    queued: frozenset = frozenset()   # previous-stage folds a queue will still train (they write theirs)
    tr_args: str = ""             # " -tr X -p Y" when not nnU-Net's defaults
    has_split: bool = True        # splits_final.json exists (nnU-Net writes it at a first training)


def required(splits, fold, identifiers: list[str]) -> list[str]:
    """The cases nnU-Net's do_split gives fold `fold`: train + val of the split, or every identifier."""
    if fold != "all" and isinstance(splits, list) and isinstance(fold, int) and 0 <= fold < len(splits):
        s = splits[fold] if isinstance(splits[fold], dict) else {}
        cases = [c for k in ("train", "val") for c in (s.get(k) or []) if isinstance(c, str)]
        return sorted(set(cases))
    return sorted(set(identifiers))


def val_folds(splits) -> dict:
    """case -> the fold of the split that validates it (the lowres fold whose validation writes it)."""
    out = {}
    if isinstance(splits, list):
        for k, s in enumerate(splits):
            for c in (s.get("val") or []) if isinstance(s, dict) else []:
                if isinstance(c, str):
                    out.setdefault(c, k)
    return out


def _few(cases) -> str:
    cases = sorted(cases)
    return ", ".join(cases[:SHOWN]) + (f" and {len(cases) - SHOWN} more" if len(cases) > SHOWN else "")


def judge(x: Input) -> tuple[str, str]:
    """(level, text): "ok" when every required case is there (or a queued previous-stage fold will write
    it), "fatal" naming what is missing and how to make it."""
    who = f"{x.configuration} fold {x.fold}"
    missing = [c for c in x.required if c not in x.present]
    if not x.required:
        return "ok", f"{who}: no training cases known yet (splits_final.json and the preprocessed data are empty)"
    vf = dict(x.val_fold)
    to_come = [c for c in missing if vf.get(c) in x.queued]
    missing = [c for c in missing if vf.get(c) not in x.queued]
    if not missing:
        extra = (f"; {len(to_come)} will be written by the queue's {x.previous} fold(s) "
                 f"{', '.join(str(f) for f in sorted(x.queued))}") if to_come else ""
        return "ok", f"{who}: {x.folder} holds the {x.previous} prediction of each of its " \
                     f"{len(x.required)} training cases{extra}"
    where = x.folder if x.folder_state == "ok" else f"{x.folder} ({x.folder_state})"
    empty = [c for c in missing if c in x.empty]
    text = (f"{who} trains on the {x.previous} prediction of each of its {len(x.required)} training cases, but "
            f"{where} lacks {len(missing)}: {_few(missing)}"
            + (f" ({len(empty)} of them empty files: an export cut short)" if empty else ""))
    by_fold: dict = {}
    for c in missing:
        by_fold.setdefault(vf.get(c), []).append(c)
    fixes = []
    for f in sorted((k for k in by_fold if k is not None), key=int):
        cmd = f"nnUNetv2_train {x.dataset} {x.previous} {f}{x.tr_args}"
        fixes.append(f"`{cmd} --val --npz`" if f in x.trained else
                     f"`{cmd} --npz` (fold {f} is not trained: its training ends with the validation)")
    if None in by_fold and not x.has_split:
        fixes.append(f"no {x.previous} fold was trained yet (no splits_final.json): train each, "
                     f"`nnUNetv2_train {x.dataset} {x.previous} FOLD{x.tr_args} --npz` for FOLD 0 to 4")
    elif None in by_fold:
        fixes.append(f"{len(by_fold[None])} case(s) no fold of splits_final.json validates ({_few(by_fold[None])}): "
                     f"train {x.previous} on the folds that cover them first")
    return "fatal", f"{text}; the {x.previous} validation writes them: " + "; ".join(fixes)
