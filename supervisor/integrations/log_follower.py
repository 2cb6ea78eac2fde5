"""Follow nnU-Net's training_log_*.txt files of one fold folder: new whole lines, oldest file first.

How it works: `LogFollower` reads every training_log_*.txt of the fold folder in chronological order
(nnU-Net opens a new file at every start) from a remembered byte offset, so only whole lines are handed
on and a partial line at the end of a file waits for its newline. Replaying old files at start-up
rebuilds the history of a run migrated from another machine or supervised before (`drain` reads them to
the end, MAX_POLL_BYTES at a time). Hostile input: `poll` reads at most MAX_POLL_BYTES per call and skips
past a line longer than training_log.MAX_LINE_BYTES, even one still without its newline, instead of
holding it or re-reading it. Parsing the lines is core/training_log.py's (pure).
"""
from __future__ import annotations

import re
from pathlib import Path

from supervisor.core.training_log import MAX_LINE_BYTES

MAX_POLL_BYTES = 1 << 20  # per LogFollower.poll call; the rest comes on the next call


def log_sort_key(p: Path):
    """training_log_2026_11_5_22_55_43.txt -> (2026, 11, 5, 22, 55, 43); unpadded, so no string sort."""
    nums = re.findall(r"\d+", p.stem)
    return tuple(int(n) for n in nums), p.name


class LogFollower:
    """Reads new whole lines from all training_log_*.txt files of one folder, oldest file first."""

    RELIST_EVERY = 20  # polls: the folder is listed again at least this often, whatever its mtime says

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets: dict[str, int] = {}
        self.skipping: set[str] = set()  # files whose current line is over-long: drop up to its newline
        self._listing: tuple[int, list[Path]] | None = None  # (folder mtime_ns, files) of the last listing
        self._polls = 0

    def files(self) -> list[Path]:
        """The logs, oldest first. Listed again only when the folder changed (nnU-Net opens a new file per
        start) or every RELIST_EVERY polls (a creation within the same mtime tick): a stat, not a glob, per
        poll of a long run."""
        self._polls += 1
        try:
            mtime = self.folder.stat().st_mtime_ns
        except OSError:
            self._listing = None
            return []
        if self._listing is None or self._listing[0] != mtime or self._polls % self.RELIST_EVERY == 0:
            try:
                self._listing = (mtime, sorted(self.folder.glob("training_log_*.txt"), key=log_sort_key))
            except OSError:
                return []
        return self._listing[1]

    def poll(self) -> list[tuple[str, str]]:
        """Return [(file name, line)] for newly completed lines, reading at most MAX_POLL_BYTES."""
        return self._poll()[0]

    def _poll(self) -> tuple[list[tuple[str, str]], int]:
        """(lines, bytes consumed) of one bounded read.

        Lines longer than MAX_LINE_BYTES are dropped. A partial last line waits for its newline unless it
        is already over-long: then its bytes are consumed and the file is marked as skipping, and the
        rest of that line, whenever it comes, is discarded up to its newline."""
        out: list[tuple[str, str]] = []
        budget, consumed = MAX_POLL_BYTES, 0
        for p in self.files():
            if budget <= 0:
                break
            off = self.offsets.get(p.name, 0)
            skipping = p.name in self.skipping
            try:
                size = p.stat().st_size
                if size < off:  # truncated or replaced: start over
                    off, skipping = 0, False
                if size == off:
                    continue
                with open(p, "rb") as fh:
                    fh.seek(off)
                    chunk = fh.read(min(size - off, budget))
            except OSError:
                continue
            budget -= len(chunk)
            start = 0
            if skipping:
                nl = chunk.find(b"\n")
                start, skipping = (len(chunk), True) if nl < 0 else (nl + 1, False)
            end = chunk.rfind(b"\n", start) + 1  # 0: no complete line in this chunk
            if end:
                for raw in chunk[start:end].split(b"\n")[:-1]:
                    if len(raw) <= MAX_LINE_BYTES:
                        out.append((p.name, raw.decode("utf-8", "replace").rstrip("\r")))
            else:
                end = start
            if len(chunk) - end > MAX_LINE_BYTES:
                end, skipping = len(chunk), True  # an over-long line without its newline: skip past it
            self.offsets[p.name] = off + end
            consumed += end
            (self.skipping.add if skipping else self.skipping.discard)(p.name)
        return out, consumed

    def drain(self):
        """Yield every line up to the current end of the files, MAX_POLL_BYTES at a time (the start-up
        replay: bounded memory, however long the logs)."""
        while True:
            batch, consumed = self._poll()
            yield from batch
            if not consumed:
                return
