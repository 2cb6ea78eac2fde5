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
  (the printed Dice is rounded to 4 decimals, so the agreement is within 5e-5). An epoch whose lines
  were unreadable leaves a gap: the EMA after it is unknown (nan), never restarted from one epoch.
- The lines come from integrations/log_follower.py (the files); nothing here does I/O.

Hostile input (a log is only text somebody wrote): the work per line and per poll is bounded. A line
longer than MAX_LINE_BYTES is not one of nnU-Net's and is ignored before any pattern sees it; the
patterns cannot backtrack (every quantified part has one way to match, ASCII only). Values are checked where they enter: a Dice outside [0, 1] (nan is
nnU-Net's own "no such class in these batches") makes the whole dice line unusable, so that epoch has
no Dice and its EMA, like nnU-Net's after an all-nan epoch, is nan from there on in this lineage: no
target is met on a guess (status shows the EMA as unknown; a resume that rewinds past the epoch mends
it); an epoch number beyond MAX_EPOCH is ignored; an epoch time that is not a
finite number in [0, MAX_EPOCH_TIME_S] is kept as unknown (None), so the record still completes and the
EMA chain stays intact. Losses stay free: nan/inf is how divergence shows.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

# nnU-Net's lines are < 1 KiB; the dice line grows ~20 bytes per class, so 8 KiB holds ~400 classes.
MAX_LINE_BYTES = 8192             # bytes in the file; characters once decoded (never more)
MAX_EPOCH = 10**7                 # nnU-Net trains 1000 epochs by default
MAX_EPOCH_TIME_S = 30 * 86400.0

# re.ASCII: \d and \s must not match other scripts' digits and spaces (int() would accept them).
# _FLOAT has exactly one way to match any text (no `\d+\.?\d*`: that splits a digit run n ways and
# backtracks quadratically on a line like "train_loss 111...1x").
_TS = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ?", re.ASCII)
_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_PATTERNS = [(kind, re.compile(rx, re.ASCII)) for kind, rx in (
    ("epoch", r"^Epoch (\d{1,8})\s*$"),
    ("lr", rf"^Current learning rate: ({_FLOAT})\s*$"),
    ("train_loss", rf"^train_loss ({_FLOAT})\s*$"),
    ("val_loss", rf"^val_loss ({_FLOAT})\s*$"),
    ("dice", r"^Pseudo dice \[([^\]]*)\]\s*$"),
    ("epoch_time", rf"^Epoch time: ({_FLOAT}) s\s*$"),
    ("best", rf"^Yayy! New best EMA pseudo Dice: ({_FLOAT})\s*$"),
    ("done", r"^Training done\.\s*$"),
    ("final_dice", rf"^Mean Validation Dice:\s+({_FLOAT})\s*$"),
)]
# numpy 2 prints np.float32(0.9623); numpy 1 prints 0.9623; either may be nan.
_DICE_ITEM = re.compile(rf"^(?:np\.float(?:16|32|64)\()?\s*({_FLOAT})\s*\)?$", re.ASCII)


def parse_dice(body: str) -> list[float] | None:
    """Per-class values of a dice line's body; None unless every item is a Dice (in [0, 1] or nan)."""
    out = []
    for it in body.split(","):
        it = it.strip()
        if not it:
            continue
        m = _DICE_ITEM.match(it)
        if not m:
            return None
        v = float(m.group(1))
        if not (math.isnan(v) or 0.0 <= v <= 1.0):
            return None  # 5.0 or inf is no Dice: a forged or garbled line must not reach a target
        out.append(v)
    return out


def parse_line(line: str):
    """Return (kind, value) for a line nnU-Net writes, or None for anything else."""
    if len(line) > MAX_LINE_BYTES:
        return None  # not one of nnU-Net's; bounds the work below
    text = _TS.sub("", line.strip(), count=1)
    for kind, rx in _PATTERNS:
        m = rx.match(text)
        if not m:
            continue
        if kind == "epoch":
            e = int(m.group(1))
            return ("epoch", e) if e <= MAX_EPOCH else None
        if kind == "dice":
            vals = parse_dice(m.group(1))
            return None if vals is None else ("dice", vals)
        if kind == "done":
            return ("done", None)
        v = float(m.group(1))
        if kind == "epoch_time" and not (0.0 <= v <= MAX_EPOCH_TIME_S):  # nan fails this too
            # still the epoch's last line: complete the record, with its time unknown
            return ("epoch_time", None)
        return (kind, v)
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


def _seconds(t) -> bool:
    return isinstance(t, (int, float)) and math.isfinite(t) and t > 0


class History:
    """Epoch records of the current lineage, with nnU-Net's EMA.

    Records are kept in epoch order (epochs only ever arrive in increasing order, or rewind), and the best
    EMA and the last epoch are kept up to date as records arrive: adding an epoch costs the same at epoch
    10,000 as at epoch 1. Only a rewind (a resume from an earlier checkpoint) walks the records."""

    def __init__(self, records: list[EpochRecord] | None = None):
        self.records: dict[int, EpochRecord] = {}
        for r in sorted(records or [], key=lambda r: r.epoch):
            self.records[r.epoch] = r
        self._recount()

    def _recount(self) -> None:
        self._seconds = sum(r.epoch_time for r in self.records.values() if _seconds(r.epoch_time))
        emas = [(r.ema, r.epoch) for r in self.records.values() if not math.isnan(r.ema)]
        self._best = max(v for v, _ in emas) if emas else None
        self._best_epoch = max((e for e, r in self.records.items() if r.new_best), default=None)
        self._last = max(self.records) if self.records else None

    def add(self, rec: EpochRecord) -> EpochRecord:
        if self._last is not None and rec.epoch <= self._last:  # a resume rewound: drop the future
            for e in [e for e in self.records if e >= rec.epoch]:
                del self.records[e]
            self._recount()
        rec.mean_fg_dice = nanmean(rec.dice)
        prev = self.records.get(rec.epoch - 1)
        if prev is not None:
            rec.ema = 0.9 * prev.ema + 0.1 * rec.mean_fg_dice
        elif self.records:
            # A gap: an earlier epoch of this lineage was logged unreadably (a garbled or hostile line).
            # nnU-Net's EMA is unknown from here on; restarting it from this epoch alone could reach a
            # target on one lucky epoch.
            rec.ema = math.nan
        else:
            # nnU-Net: ema = value when its ema list is empty (epoch 0). A record with no predecessor
            # later than 0 means we never saw the earlier epochs; the same formula is the best guess.
            rec.ema = rec.mean_fg_dice
        best = self._best
        rec.new_best = not math.isnan(rec.ema) and (best is None or rec.ema > best)
        self.records[rec.epoch] = rec
        self._last = rec.epoch
        if _seconds(rec.epoch_time):
            self._seconds += rec.epoch_time
        if rec.new_best:
            self._best, self._best_epoch = rec.ema, rec.epoch
        return rec

    def best_ema(self) -> float | None:
        return self._best

    def trained_seconds(self) -> float | None:
        """The epochs' times added up: what a fresh start would lose (None: no epoch known)."""
        return self._seconds if self.records else None

    def best_epoch(self) -> int | None:
        """The last epoch that set a new best EMA (nnU-Net wrote checkpoint_best.pth after it)."""
        return self._best_epoch

    def last(self) -> EpochRecord | None:
        return self.records[self._last] if self._last is not None else None

    def ordered(self) -> list[EpochRecord]:
        return list(self.records.values())  # insertion order is epoch order (see add)

    def tail(self, n: int) -> list[EpochRecord]:
        """The last `n` records, oldest first, without walking the others."""
        out = []
        for e in reversed(self.records):
            if len(out) == n:
                break
            out.append(self.records[e])
        return out[::-1]


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
    """Fold (file name, line) pairs, e.g. LogFollower.drain(), into a History. A half-logged last epoch is
    dropped: a new attempt logs its own."""
    h, asm = history if history is not None else History(), EpochAssembler()
    for _name, line in lines:
        ev = parse_line(line)
        if ev is not None and (rec := asm.feed(ev)) is not None:
            h.add(rec)
    return h
