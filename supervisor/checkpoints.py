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
