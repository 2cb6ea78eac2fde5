"""Before each (re)start: is the checkpoint `--c` will load readable? If not, move it aside and fall back.

How it works, without importing torch into the long-running supervisor: torch.save writes a zip archive
(`<name>/data.pkl`, `<name>/data/0`, ...). `verify` opens it with zipfile, which needs an intact central
directory (a truncated file fails here, exactly where torch.load fails with "PytorchStreamReader failed
finding central directory"), requires a data.pkl entry, and CRC-checks every entry (testzip), which
catches flipped or zeroed bytes. `pick_resume` walks nnU-Net's own order (final, latest, best): a file
that fails, or that the previous attempt died loading (reason corrupt_checkpoint), is renamed to
`<name>.corrupt-<UTC time>` (never deleted) and the next one is tried. Temp files that a killed atomic
writer left behind (`.checkpoint_*.pth.tmp-PID`, PID no longer alive) are ours and are removed.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .job import CHECKPOINT_ORDER
from .store import move_aside

_TMP = re.compile(r"^\.checkpoint_\w+\.pth\.tmp-(\d+)$")


def verify(path: Path) -> str | None:
    """None when the checkpoint is a complete torch archive, else what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if not any(n.endswith("data.pkl") for n in names):
                return "no data.pkl in the archive (not a torch checkpoint)"
            bad = z.testzip()
            if bad is not None:
                return f"CRC mismatch in {bad}"
    except zipfile.BadZipFile as e:
        return f"not a complete zip archive ({e})"
    except (OSError, EOFError, ValueError, RuntimeError) as e:
        return f"unreadable ({e})"
    return None


@dataclass
class Pick:
    resume: Path | None                   # what --c will load; None = no checkpoint left
    moved: list[tuple[str, str, str]] = field(default_factory=list)  # (file, moved_to, why)
    had_any: bool = False                 # some checkpoint existed before we looked


def pick_resume(fold: Path, suspect: str | None = None, check: bool = True) -> Pick:
    out = Pick(resume=None)
    for name in CHECKPOINT_ORDER:
        p = fold / name
        if not p.is_file():
            continue
        out.had_any = True
        why = "the previous attempt died loading it" if name == suspect else (verify(p) if check else None)
        if why is None:
            out.resume = p
            return out
        out.moved.append((name, str(move_aside(p, "corrupt")), why))
    return out


def remove_stale_temp_files(fold: Path) -> list[str]:
    removed = []
    try:
        entries = list(fold.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer is still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def choose(fold: Path, suspect: str | None, cfg, history, log, record) -> tuple[bool, Path | None]:
    """(ok, what --c will load): tidy temp files, verify, move bad ones aside (logged and recorded),
    estimate the epochs a fallback to checkpoint_best costs; ok is False when nothing readable is left
    and a fresh start is not allowed."""
    for name in remove_stale_temp_files(fold):
        log.info("removed_stale_temp_file", file=name)
    pick = pick_resume(fold, suspect=suspect, check=cfg.checkpoint.verify)
    for name, dest, why in pick.moved:
        log.error("checkpoint_moved_aside", file=name, moved_to=dest, why=why)
        record(name, dest, why)
    if pick.moved and pick.resume is not None:
        best = [r.epoch for r in history.ordered() if r.new_best]
        last = history.last()
        lost = (last.epoch - best[-1]) if last and best and "best" in pick.resume.name else None
        log.warning("checkpoint_fallback", resume_from=pick.resume.name, epochs_lost=lost)
    if pick.had_any and pick.resume is None:
        if not cfg.checkpoint.allow_fresh_start:
            return False, None
        log.warning("fresh_start", why="no readable checkpoint left; checkpoint.allow_fresh_start = true")
    return True, pick.resume
