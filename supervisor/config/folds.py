"""Folds as people write them: the one fold-list parser (`run --fold`, `slurm-script --folds`, `pack --folds`
and `[queue] folds`), in SLURM's array syntax ("0-4", "0,2,4", "1-3,5") or nnU-Net's fold "all".
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
