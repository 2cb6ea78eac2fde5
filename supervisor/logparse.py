"""Turn nnU-Net's training_log_*.txt files into epoch records, with the EMA computed as nnU-Net does.

How it works
- `parse_line` recognises one log line (timestamp prefix optional) and returns a small tuple event or
  None for foreign lines (warnings, prints from custom trainers, blank lines).
- `EpochAssembler` folds those line events into `EpochRecord`s. A record is complete at the
  "Epoch time:" line, the last line nnU-Net writes for an epoch before its checkpoint saves.
- `History` keeps records by epoch and computes the EMA exactly like nnunetv2's nnUNetLogger:
  ema_0 = mean_fg_dice_0, ema_e = 0.9 * ema_{e-1} + 0.1 * mean_fg_dice_e, where mean_fg_dice is the
  nanmean of the per-class pseudo Dice. When a resume rewinds (`--c` from checkpoint_best goes back to
  the best epoch), a record for epoch e replaces e and drops everything after it: the checkpoint's
  logger holds exactly the lineage 0..e-1, so our EMA stays equal to nnU-Net's own `ema_fg_dice`
  (the printed Dice is rounded to 4 decimals, so the agreement is within 5e-5).
- `LogFollower` reads every training_log_*.txt of the fold folder in chronological order (nnU-Net opens
  a new file at every start) from a remembered byte offset, so only whole lines are parsed and a partial
  line at the end of a file waits for its newline. Replaying old files at start-up rebuilds the history
  of a run migrated from another machine or supervised before.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

_TS = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ?")
_FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf|-inf)"
_PATTERNS = [
    ("epoch", re.compile(r"^Epoch (\d+)\s*$")),
    ("lr", re.compile(rf"^Current learning rate: ({_FLOAT})\s*$")),
    ("train_loss", re.compile(rf"^train_loss ({_FLOAT})\s*$")),
    ("val_loss", re.compile(rf"^val_loss ({_FLOAT})\s*$")),
    ("dice", re.compile(r"^Pseudo dice \[(.*)\]\s*$")),
    ("epoch_time", re.compile(rf"^Epoch time: ({_FLOAT}) s\s*$")),
    ("best", re.compile(rf"^Yayy! New best EMA pseudo Dice: ({_FLOAT})\s*$")),
    ("done", re.compile(r"^Training done\.\s*$")),
    ("final_dice", re.compile(rf"^Mean Validation Dice:\s+({_FLOAT})\s*$")),
]
# numpy 2 prints np.float32(0.9623); numpy 1 prints 0.9623; either may be nan.
_DICE_ITEM = re.compile(rf"^(?:np\.float(?:16|32|64)\()?\s*({_FLOAT})\s*\)?$")


def _f(s: str) -> float:
    return float(s)


def parse_dice(body: str) -> list[float] | None:
    items = [x.strip() for x in body.split(",") if x.strip()]
    out = []
    for it in items:
        m = _DICE_ITEM.match(it)
        if not m:
            return None
        out.append(float(m.group(1)))
    return out


def parse_line(line: str):
    """Return (kind, value) for a line nnU-Net writes, or None for anything else."""
    text = _TS.sub("", line.strip(), count=1)
    for kind, rx in _PATTERNS:
        m = rx.match(text)
        if not m:
            continue
        if kind == "epoch":
            return ("epoch", int(m.group(1)))
        if kind == "dice":
            vals = parse_dice(m.group(1))
            return None if vals is None else ("dice", vals)
        if kind == "done":
            return ("done", None)
        return (kind, _f(m.group(1)))
    return None


def nanmean(xs: list[float]) -> float:
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class EpochRecord:
    epoch: int
    lr: float | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    dice: list[float] = field(default_factory=list)
    epoch_time: float | None = None
    mean_fg_dice: float = math.nan
    ema: float = math.nan
    new_best: bool = False

    def to_json(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "EpochRecord":
        d = dict(d)
        for k in ("lr", "train_loss", "val_loss", "epoch_time", "mean_fg_dice", "ema"):
            if d.get(k) is None and k in ("mean_fg_dice", "ema"):
                d[k] = math.nan
        d["dice"] = [math.nan if v is None else v for v in d.get("dice", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _json_float(v):
    """JSON has no NaN: store non-finite floats as None (lists too)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_float(x) for x in v]
    return v


class History:
    """Epoch records of the current lineage, with nnU-Net's EMA."""

    def __init__(self, records: list[EpochRecord] | None = None):
        self.records: dict[int, EpochRecord] = {r.epoch: r for r in (records or [])}

    def add(self, rec: EpochRecord) -> EpochRecord:
        for e in [e for e in self.records if e >= rec.epoch]:  # a resume rewound: drop the future
            del self.records[e]
        rec.mean_fg_dice = nanmean(rec.dice)
        prev = self.records.get(rec.epoch - 1)
        if prev is not None:
            rec.ema = 0.9 * prev.ema + 0.1 * rec.mean_fg_dice
        else:
            # nnU-Net: ema = value when its ema list is empty (epoch 0). A record with no predecessor
            # later than 0 means we never saw the earlier epochs; the same formula is the best guess.
            rec.ema = rec.mean_fg_dice
        best = self.best_ema()
        rec.new_best = not math.isnan(rec.ema) and (best is None or rec.ema > best)
        self.records[rec.epoch] = rec
        return rec

    def best_ema(self) -> float | None:
        vals = [r.ema for r in self.records.values() if not math.isnan(r.ema)]
        return max(vals) if vals else None

    def last(self) -> EpochRecord | None:
        return self.records[max(self.records)] if self.records else None

    def ordered(self) -> list[EpochRecord]:
        return [self.records[e] for e in sorted(self.records)]


class EpochAssembler:
    """Folds parse_line events into complete EpochRecords (complete at "Epoch time")."""

    def __init__(self):
        self.current: EpochRecord | None = None

    def feed(self, ev) -> EpochRecord | None:
        kind, val = ev
        if kind == "epoch":
            self.current = EpochRecord(epoch=val)
            return None
        if self.current is None:
            return None
        if kind == "lr":
            self.current.lr = val
        elif kind in ("train_loss", "val_loss"):
            setattr(self.current, kind, val)
        elif kind == "dice":
            self.current.dice = val
        elif kind == "epoch_time":
            rec, self.current = self.current, None
            rec.epoch_time = val
            return rec
        return None


def replay(lines, history: History | None = None) -> History:
    """Fold (file name, line) pairs, e.g. LogFollower.poll(), into a History. A half-logged last epoch is
    dropped: a new attempt logs its own."""
    h, asm = history if history is not None else History(), EpochAssembler()
    for _name, line in lines:
        ev = parse_line(line)
        if ev is not None and (rec := asm.feed(ev)) is not None:
            h.add(rec)
    return h


def log_sort_key(p: Path):
    """training_log_2026_11_5_22_55_43.txt -> (2026, 11, 5, 22, 55, 43); unpadded, so no string sort."""
    nums = re.findall(r"\d+", p.stem)
    return tuple(int(n) for n in nums), p.name


class LogFollower:
    """Reads new whole lines from all training_log_*.txt files of one folder, oldest file first."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets: dict[str, int] = {}

    def files(self) -> list[Path]:
        try:
            return sorted(self.folder.glob("training_log_*.txt"), key=log_sort_key)
        except OSError:
            return []

    def newest(self) -> Path | None:
        fs = self.files()
        return fs[-1] if fs else None

    def poll(self) -> list[tuple[str, str]]:
        """Return [(file name, line)] for every newly completed line."""
        out = []
        for p in self.files():
            off = self.offsets.get(p.name, 0)
            try:
                size = p.stat().st_size
                if size < off:  # truncated or replaced: start over
                    off = 0
                if size == off:
                    continue
                with open(p, "rb") as fh:
                    fh.seek(off)
                    chunk = fh.read(size - off)
            except OSError:
                continue
            end = chunk.rfind(b"\n")
            if end < 0:
                continue  # only a partial line so far
            for raw in chunk[: end + 1].splitlines():
                out.append((p.name, raw.decode("utf-8", "replace")))
            self.offsets[p.name] = off + end + 1
        return out
