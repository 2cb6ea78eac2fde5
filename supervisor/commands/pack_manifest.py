"""The archive's MANIFEST.json: what `pack` writes first and `unpack` checks every member against.

How it works
- An archive is a plain (PAX) tar stream. Its first member is `MANIFEST.json`, its last
  `MANIFEST.json.sha256` (the manifest's own sha256, so an edited or damaged manifest is refused even
  where it still parses). Between them, one regular-file member per file, named `<root>/<path>` with
  root one of `raw`, `preprocessed`, `results` (nnUNet_raw / nnUNet_preprocessed / nnUNet_results).
- The manifest lists every file once: root, path (relative to the root), size, sha256, in member
  order; plus the source's Python, nnunetv2, torch and numpy versions (from the installed
  distributions' metadata: nothing is imported), the device, and per fold the checkpoint `--c` would
  resume from with its epoch and EMA.
- `parse(data)` validates a manifest and raises BadArchive naming what is wrong; `safe_relpath`
  refuses absolute paths, `..`, empty or `.` parts, backslashes and NUL bytes (an entry must not be
  able to leave its root, whatever the unpacking side's folders look like). The job's names and each
  fold's path are checked too: unpack builds paths from them.
- Parsing costs bounded memory: unpack reads at most MAX_MANIFEST_BYTES, and counts the bytes that
  can start a JSON value (`,` `:` `{` `[`) as it reads, and `parse` again before json.loads: pack writes
  one per ~20 bytes (a file entry: ~190 bytes, 9 values), so more than one per MIN_BYTES_PER_VALUE is
  refused (`check_density`). Without it 32 MB of `{},{},...` become 10 million dicts (~850 MB); with it
  parsing costs at most ~8 times the manifest's size (measured), and such a bomb is refused at its first MiB.
- `read_checkpoint(file)` (integrations/checkpoints.py, where `run`'s start-up reads it too) reads a torch
  checkpoint's epoch and EMA without torch, and whether it was pickled under numpy 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from importlib import metadata

from supervisor.integrations.checkpoints import read_checkpoint  # noqa: F401  (pack, unpack and tests read it here)

FORMAT = "cardiacseg-pack/1"
MANIFEST = "MANIFEST.json"
MANIFEST_SUM = "MANIFEST.json.sha256"
ROOTS = ("raw", "preprocessed", "results")
MAX_MANIFEST_BYTES = 64 << 20  # ~200 bytes per file: 300 000 files (a large nnU-Net job has ~30 000)
MIN_BYTES_PER_VALUE = 12  # pack's densest entry (root "raw", a 3-character path) has 15.6
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BadArchive(Exception):
    """The archive (or a member, named in the message) is not what pack writes: nothing is placed."""


def safe_relpath(rel: object) -> str | None:
    """What is wrong with a path that must stay inside its root, or None when it is fine."""
    if not isinstance(rel, str) or not rel:
        return "an empty path"
    if "\0" in rel or "\\" in rel:
        return "a path with a NUL byte or backslash"
    if rel.startswith("/"):
        return "an absolute path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with '..', '.' or an empty part (it could leave its root)"
    return None


def member_name(root: str, rel: str) -> str:
    return f"{root}/{rel}"


def versions() -> dict:
    """This machine's Python and the installed nnunetv2/torch/numpy (metadata only: no import)."""
    out = {"python": platform.python_version()}
    for dist in ("nnunetv2", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def version_tuple(v: str | None) -> tuple[int, ...]:
    """'2.6.0+cu124' -> (2, 6, 0); None or garbage -> ()."""
    nums = re.findall(r"\d+", (v or "").split("+")[0])[:3]
    return tuple(int(n) for n in nums)


def build(files: list[dict], folds: list[dict], job: dict, device: str | None) -> bytes:
    doc = {"format": FORMAT, "job": job, "source": {**versions(), "device": device},
           "folds": folds, "files": files}
    return (json.dumps(doc, indent=1) + "\n").encode()


def digest_line(manifest_bytes: bytes) -> bytes:
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n".encode()


def values_in(data: bytes) -> int:
    """How many JSON values `data` can start at most (every one but the first follows , : { or [)."""
    return sum(data.count(c) for c in (b",", b":", b"{", b"["))


def check_density(size: int, values: int) -> None:
    """BadArchive when `size` bytes of manifest (or of its beginning) start more values than pack writes."""
    if size > MAX_MANIFEST_BYTES or values > size // MIN_BYTES_PER_VALUE + 1024:
        raise BadArchive(f"{MANIFEST}: {values} JSON values in {size} bytes; expected at most {MAX_MANIFEST_BYTES} "
                         f"bytes and one value per {MIN_BYTES_PER_VALUE} bytes (pack writes one per ~20): "
                         "refused before parsing it")


def parse(data: bytes) -> dict:
    """A validated manifest, or BadArchive saying what is wrong with it."""
    check_density(len(data), values_in(data))
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadArchive(f"{MANIFEST}: not valid JSON ({e})") from None
    except RecursionError:
        raise BadArchive(f"{MANIFEST}: nested too deeply to be a manifest") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise BadArchive(f"{MANIFEST}: expected format {FORMAT!r}, got {got!r}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise BadArchive(f"{MANIFEST}: key 'files': expected a list")
    seen, folders = set(), set()
    for i, f in enumerate(files):
        where = f"{MANIFEST}: files[{i}]"
        if not isinstance(f, dict):
            raise BadArchive(f"{where}: expected an object")
        if f.get("root") not in ROOTS:
            raise BadArchive(f"{where}: root expected one of {', '.join(ROOTS)}, got {f.get('root')!r}")
        if (why := safe_relpath(f.get("path"))) is not None:
            raise BadArchive(f"{where}: path {f.get('path')!r} is {why}")
        size = f.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadArchive(f"{where} ({f['path']}): size expected an integer >= 0, got {size!r}")
        if not isinstance(f.get("sha256"), str) or not _HEX64.match(f["sha256"]):
            raise BadArchive(f"{where} ({f['path']}): sha256 expected 64 hex digits")
        name = member_name(f["root"], f["path"])
        if name in seen:
            raise BadArchive(f"{where}: {name} is listed twice")
        seen.add(name)
        parts = name.split("/")
        folders.update("/".join(parts[:k]) for k in range(2, len(parts)))
    if clash := next((n for n in seen if n in folders), None):
        raise BadArchive(f"{MANIFEST}: {clash} is listed as a file and as a folder of another file")
    for key in ("folds", "source", "job"):
        if not isinstance(doc.get(key), list if key == "folds" else dict):
            raise BadArchive(f"{MANIFEST}: key {key!r} missing or of the wrong type")
    for key in ("dataset", "configuration", "trainer", "plans"):
        v = doc["job"].get(key)
        if not isinstance(v, str) or safe_relpath(v) is not None or "/" in v:
            raise BadArchive(f"{MANIFEST}: job.{key} expected a folder name, got {v!r}")
    for i, f in enumerate(doc["folds"]):
        fold = f.get("fold") if isinstance(f, dict) else None
        if not (fold == "all" or (isinstance(fold, int) and not isinstance(fold, bool) and fold >= 0)):
            raise BadArchive(f"{MANIFEST}: folds[{i}].fold expected a fold number or 'all', got {fold!r}")
        if (why := safe_relpath(f.get("path"))) is not None:
            raise BadArchive(f"{MANIFEST}: folds[{i}].path {f.get('path')!r} is {why}")
    return doc


def describe_resume(fold, name: str | None, info: dict | None) -> str:
    """`fold 0: checkpoint_latest.pth, epoch 312, EMA 0.683` (epoch: where `--c` continues)."""
    if name is None:
        return f"fold {fold}: no checkpoint, `--c` starts a new training at epoch 0"
    info = info or {}
    ema = f", EMA {info['ema']:.3f}" if isinstance(info.get("ema"), float) else ""
    return f"fold {fold}: {name}, epoch {info.get('epoch', '?')}{ema}"


# ---- progress on a terminal -------------------------------------------------------------------------
class Progress:
    """`pack: writing 1.2/10.0 GB  180 MB/s  ETA 49 s` on stderr, redrawn at most twice a second; silent
    when stderr is not a terminal or under systemd (INVOCATION_ID / JOURNAL_STREAM set) or quiet=True."""

    def __init__(self, what: str, total: int, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.what, self.total, self.done = what, total, 0
        under_systemd = bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.on = tty and not under_systemd and not quiet
        self.t0 = self.last = time.monotonic()

    def __enter__(self):
        return self

    def add(self, n: int) -> None:
        self.done += n
        if self.on:
            now = time.monotonic()
            if now - self.last >= 0.5:
                self.last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-6)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        self.stream.write(f"\r{self.what} {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  "
                          f"{rate / 1e6:.0f} MB/s  ETA {eta:.0f} s   ")
        self.stream.flush()

    def __exit__(self, *exc):
        if self.on:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
