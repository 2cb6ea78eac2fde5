"""epochs.jsonl: the supervised epochs, one JSON object per line, appended as they finish.

How it works
- state.json is a small record rewritten atomically after every change; the epochs, which grow with the
  run, live beside it in `<state_dir>/epochs.jsonl` so that a save costs the same at epoch 10,000 as at
  epoch 1 (rewriting every epoch into state.json made the cost of a run quadratic in its length).
- The daemon rewrites the whole file once at start-up from the history it replayed from nnU-Net's logs
  (the logs are the truth), then `append`s one line per finished epoch: O_APPEND, never through a link
  (store.open_append_nofollow), not fsynced: the file is derived, rebuilt from the logs at every start.
- `read(state_dir)` rebuilds the list with the history's own rule: a record for epoch k drops every record
  for epochs >= k before it (a resume that rewound), so the last word per epoch wins. A line that is not a
  JSON object with an integer "epoch" (a torn last line after a crash, a hostile edit) is skipped; the
  file is read at most MAX_BYTES from its end (a planted multi-GB file cannot exhaust `status`'s memory).
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from supervisor.integrations.store import NOFOLLOW, atomic_write, open_append_nofollow

FILE = "epochs.jsonl"
MAX_BYTES = 256 * 1024 * 1024  # ~800,000 epochs of nnU-Net's record; the tail is what matters anyway


def _line(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":"), allow_nan=False) + "\n").encode()


class EpochLog:
    """The daemon's writer. Raises OSError on a failed write; the caller warns and goes on."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / FILE
        self.fd: int | None = None

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file by exactly `records` (atomic), and append to the new file from now on."""
        self.close()
        atomic_write(self.path, b"".join(_line(r) for r in records))

    def append(self, rec: dict) -> None:
        if self.fd is None:
            self.fd, _moved = open_append_nofollow(self.path)
        data = _line(rec)
        try:
            n = os.write(self.fd, data)
            if n != len(data):  # a short write (disk full after part of the line): the reader skips it
                raise OSError(errno.ENOSPC, "short write")
            # no fsync: the file is derived (rewritten from nnU-Net's logs at every start), and an fsync per
            # epoch would be the supervisor's largest cost at short epochs
        except OSError:
            self.close()  # reopened at the next epoch: a torn line is ended by the reader's rule
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read(state_dir: Path) -> list[dict] | None:
    """The epochs in order, or None when there is no epochs file. Raises ValueError for a file that is
    not a regular file (never followed through a link)."""
    path = Path(state_dir) / FILE
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link, which the supervisor never writes") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > MAX_BYTES:
            fh.seek(st.st_size - MAX_BYTES)
            fh.readline()  # the first, partial line
        records: list[dict] = []
        for raw in fh:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(rec, dict) or type(rec.get("epoch")) is not int:
                continue
            while records and records[-1]["epoch"] >= rec["epoch"]:  # each record is dropped at most once
                records.pop()
            records.append(rec)
    return records
