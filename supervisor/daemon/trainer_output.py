"""The trainer's output: per-attempt log file, stderr evidence, and lines for the supervisor's log.

How it works: `TrainerOutput.feed(stream, data)` receives raw chunks read from the trainer's pipes. Bytes
go unchanged to `<state_dir>/attempts/attempt-NNNN.log`; the last 64 KiB of stderr are kept as the
evidence `classify` reads; complete lines are split out and passed through a `TracebackGrouper`, which
holds a Python traceback ("Traceback (most recent call last):" ... up to the first unindented line, the
exception itself) together, so it becomes one log event (one journal entry) instead of thirty. A group
still open after `GROUP_HOLD_S` (a trainer hung mid-traceback) or at the end of the stream is flushed.

The per-attempt log is a convenience, state.json is not: the log never ends the supervisor. It is opened
by store.open_append_nofollow (a planted link is moved aside and replaced by a regular file, `warn` is
told `attempt_log_moved_aside`). Writing stops for the rest of the attempt, told once through `warn` as
`attempt_log_stopped` (and readable as `.log_error`), when a write fails (ENOSPC, EDQUOT, EIO, any
OSError) or when the file system has less than `reserve_bytes` free, so a filling disk takes the log
before it takes state.json. Lines are still returned for forwarding, and stderr still kept as evidence.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from supervisor.core.training_log import MAX_LINE_BYTES
from supervisor.integrations.store import UnsafePathError, open_append_nofollow

STDERR_TAIL_BYTES = 64 * 1024
GROUP_HOLD_S = 1.0
GROUP_MAX_LINES = 400
LOG_RESERVE_BYTES = 1 << 20  # stop the attempt log while less is free: room for state.json
TRUNCATED = b" [... line cut: longer than the supervisor keeps; the attempt log has all of it]"
_STARTS = ("Traceback (most recent call last):", "Exception in thread ")
_CONTINUES = ("Traceback (most recent call last):", "During handling of the above exception",
              "The above exception was the direct cause")


def _cut(line: bytes) -> bytes:
    return line if len(line) <= MAX_LINE_BYTES else line[:MAX_LINE_BYTES] + TRUNCATED


class TracebackGrouper:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.buf: list[str] | None = None
        self.since = 0.0

    def feed(self, line: str) -> list[str]:
        if self.buf is None:
            if line.startswith(_STARTS):
                self.buf, self.since = [line], self.clock()
                return []
            return [line]
        self.buf.append(line)
        if line.startswith((" ", "\t")) or line.startswith(_CONTINUES) or not line.strip() \
                or (len(self.buf) == 2 and self.buf[0].startswith("Exception in thread")):
            if len(self.buf) < GROUP_MAX_LINES:
                return []
        return self.flush()  # the unindented exception line closes the traceback

    def flush(self) -> list[str]:
        if self.buf is None:
            return []
        text, self.buf = "\n".join(self.buf).rstrip("\n"), None
        return [text]

    def stale(self) -> bool:
        return self.buf is not None and self.clock() - self.since > GROUP_HOLD_S


class TrainerOutput:
    def __init__(self, log_path: Path, warn=None, reserve_bytes: int = LOG_RESERVE_BYTES):
        """`warn(event, **fields)` is told, once each, when the log was moved aside or stopped;
        `reserve_bytes` 0 writes until the file system refuses."""
        self.path = Path(log_path)
        self.warn = warn if warn is not None else (lambda event, **fields: None)
        self.reserve = reserve_bytes
        self.fd: int | None = None
        self.log_error: str | None = None  # why the attempt log stopped being written, or None
        self.partial = {"stdout": b"", "stderr": b""}  # at most MAX_LINE_BYTES each
        self.skipping = {"stdout": False, "stderr": False}  # inside a line already cut at MAX_LINE_BYTES
        self.groupers = {"stdout": TracebackGrouper(), "stderr": TracebackGrouper()}
        self.stderr_tail = bytearray()
        try:
            self.fd, moved = open_append_nofollow(self.path)
        except (OSError, UnsafePathError) as e:  # no inodes left, no permission, attempts/ is a link
            self._stop(getattr(e, "strerror", None) or str(e))
            return
        if moved is not None:
            self.warn("attempt_log_moved_aside", path=str(self.path), moved_to=str(moved),
                      why="not a regular file (a link?); a new log was started")

    def _stop(self, why: str) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.log_error is None:
            self.log_error = why
            self.warn("attempt_log_stopped", path=str(self.path), why=why)

    def _write(self, data: bytes) -> None:
        if self.fd is None or not data:
            return
        try:
            st = os.fstatvfs(self.fd) if self.reserve > 0 else None  # 0: until the disk refuses
            if st is not None and st.f_bavail * st.f_frsize < self.reserve + len(data):
                self._stop(f"less than {self.reserve // 1024} KiB free on its file system; kept free "
                           "for state.json")
                return
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self._stop(e.strerror or str(e))

    def feed(self, stream: str, data: bytes) -> list[tuple[str, str]]:
        """Take a chunk; return [(stream, text)] entries ready to log."""
        self._write(data)
        if stream == "stderr":
            self.stderr_tail += data
            del self.stderr_tail[:-STDERR_TAIL_BYTES]
        return self._group(stream, self._lines(stream, data))

    def _lines(self, stream: str, data: bytes) -> list[bytes]:
        """Complete lines of `data`, with what came before it on the stream. A line is kept up to
        MAX_LINE_BYTES: the rest of it, up to its newline, is dropped (the attempt log has it all), so a
        trainer printing endlessly without a newline costs constant memory and linear time."""
        *done, rest = data.split(b"\n")
        lines = []
        if done:
            if not self.skipping[stream]:
                lines.append(_cut(self.partial[stream] + done[0]))
            lines += [_cut(ln) for ln in done[1:]]
            self.partial[stream], self.skipping[stream] = b"", False
        if self.skipping[stream]:
            return lines
        room = MAX_LINE_BYTES - len(self.partial[stream])
        if len(rest) > room:  # too long: say so once, then skip to its newline
            lines.append(self.partial[stream] + rest[:room] + TRUNCATED)
            self.partial[stream], self.skipping[stream] = b"", True
        else:
            self.partial[stream] += rest
        return lines

    def end(self, stream: str) -> list[tuple[str, str]]:
        """The stream closed: flush its partial line and any open group."""
        rest, self.partial[stream], self.skipping[stream] = self.partial[stream], b"", False
        out = self._group(stream, [rest] if rest else [])
        return out + [(stream, t) for t in self.groupers[stream].flush()]

    def flush_stale(self) -> list[tuple[str, str]]:
        return [(s, t) for s, g in self.groupers.items() if g.stale() for t in g.flush()]

    def _group(self, stream: str, lines: list[bytes]) -> list[tuple[str, str]]:
        out = []
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            out += [(stream, t) for t in self.groupers[stream].feed(text)]
        return [(s, t) for s, t in out if t.strip()]

    def evidence(self) -> str:
        return self.stderr_tail.decode("utf-8", "replace")

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
