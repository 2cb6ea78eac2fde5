"""Folds as people write them: the one fold-list parser (`run --fold`, `slurm-script --folds`, `pack --folds`
and `[queue] folds`), in SLURM's array syntax ("0-4", "0,2,4", "1-3,5") or "all".

How it works: `parse_folds` reads the syntax alone (no file). `expand` then makes a LIST of folds concrete
for a dataset: there `all` means every fold of its cross-validation (splits_final.json, read by
job.cross_validation), and a fold the split does not have, or one given twice, is refused. A single fold
(`run --fold`, `[training] fold`) stays as written: there "all" is nnU-Net's own fold, trained on every case.
"""
from __future__ import annotations

import re


def parse_folds(text: str) -> list:
    """The one fold-list parser (`run --fold`, `slurm-script --folds`, `pack --folds`): comma-separated
    folds and ranges in SLURM's array syntax ("0-4", "0,2,4", "1-3,5") or nnU-Net's fold "all".
    ValueError names what is wrong; a fold given twice is refused."""
    out: list = []
    for part in (p.strip() for p in str(text).split(",")):
        if part == "all":
            out.append("all")
            continue
        m = re.fullmatch(r"(\d{1,3})(?:-(\d{1,3}))?", part, re.ASCII)
        if not m:
            raise ValueError(f"expected folds like 0,1,2 or 0-4 (or all), got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"the range {part} runs backwards")
        out += range(lo, hi + 1)
    dup = sorted({str(f) for f in out if out.count(f) > 1})
    if dup:
        raise ValueError(f"fold {', '.join(dup)} given twice in {text!r}")
    return out


def parse_fold(text: str):
    """Exactly one fold (an array task's --fold): an integer or "all"."""
    folds = parse_folds(text)
    if len(folds) != 1:
        raise ValueError(f"expected one fold, got {text!r}")
    return folds[0]


def expand(folds: list, known: list[int], source: str) -> list[int]:
    """A parsed fold list for a dataset whose cross-validation has the folds `known` (`source` says where
    that came from): `all` becomes those folds; ValueError names a fold outside them or one given twice."""
    out: list = []
    for f in folds:
        out += known if f == "all" else [f]
    dup = sorted({f for f in out if out.count(f) > 1})
    if dup:
        raise ValueError(f"fold {', '.join(map(str, dup))} given twice (all = {_ranges(known)})")
    unknown = [f for f in out if f not in known]
    if unknown:
        raise ValueError(f"fold {', '.join(map(str, unknown))} does not exist: {source}")
    return out


def _ranges(folds: list[int]) -> str:
    """[0, 1, 2, 4] -> "0-2,4": SLURM's array syntax, as short as it gets."""
    runs: list[list[int]] = []
    for f in sorted(folds):
        if runs and f == runs[-1][1] + 1:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"
