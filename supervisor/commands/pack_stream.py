"""The pack archive written as one stream: MANIFEST.json first, every file checked against it as it goes.

How it works
- Two passes, so the manifest (sizes and sha256) can come FIRST and unpack can check each member as it
  streams: `hash_pass` hashes every file, `write` streams it again through tarfile, re-hashing exactly
  the bytes it writes. Each file is packed as pass 1 saw it: its first `size` bytes. Bytes appended
  since (a training log) are not packed; a file whose hashed bytes changed, or that shrank, fails the
  pack (PackError naming it).
- Constant memory, whatever the files' sizes and count: files are read in CHUNK blocks; tarfile writes
  straight to the output (mode `w` on `_Sink`, a position-counting wrapper, so a pipe works: its `w|`
  stream mode copies what is left of its buffer on every small write, quadratic in small files) and
  forgets each member's header once written. Held whole: the manifest (~200 bytes per file, at most
  MAX_MANIFEST_BYTES) and what collect captured of the fold folders (at most CAPTURE_BUDGET in all).
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from supervisor.commands import pack_manifest as mf

CHUNK = 1 << 20
CAPTURE_BUDGET = 16 << 20  # a fold's logs, progress.png and debug.json take ~1 MB: a dozen folds' worth


class PackError(Exception):
    """Bad input to pack (a missing file or folder, a bad argument): exit 2, no traceback."""


@dataclass
class Source:
    root: str
    rel: str
    path: Path
    size: int = 0
    sha256: str = ""
    mtime: float = 0.0
    data: bytes | None = None  # captured by collect (fold-folder files, CAPTURE_BUDGET in all)
    fh: object = None          # held open since it was verified (checkpoints)


def _open(s: Source):
    """s's bytes as a binary file: the captured copy, the checkpoint held open, or the file itself."""
    if s.data is not None:
        return io.BytesIO(s.data)
    if s.fh is not None:
        s.fh.seek(0)
        return s.fh
    return open(s.path, "rb")


def _close(s: Source, fh) -> None:
    if fh is not s.fh:
        fh.close()


def hash_pass(sources: list[Source], progress: mf.Progress) -> None:
    for s in sources:
        h, n = hashlib.sha256(), 0
        s.mtime = s.path.stat().st_mtime
        fh = _open(s)
        try:
            while block := fh.read(CHUNK):
                h.update(block)
                n += len(block)
                progress.add(len(block))
        finally:
            _close(s, fh)
        s.size, s.sha256 = n, h.hexdigest()


class _Exactly:
    """What tarfile reads for one member: the s.size bytes hashed in pass 1, hashed again as they are read;
    PackError when the file shrank or those bytes changed. Bytes appended since (a log) are not read."""

    def __init__(self, s: Source, fh, progress: mf.Progress):
        self.s, self.fh, self.left, self.h, self.p = s, fh, s.size, hashlib.sha256(), progress

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = self.fh.read(n) if n else b""
        self.left -= len(out)
        self.h.update(out)
        self.p.add(len(out))
        if len(out) < n:
            raise PackError(f"cannot pack: {self.s.path} shrank while packing; run pack again")
        if self.left == 0 and self.h.hexdigest() != self.s.sha256:
            raise PackError(f"cannot pack: {self.s.path} changed while packing; run pack again")
        return out


class _Sink:
    """The output as tarfile's `w` mode needs it (write + tell), on a pipe too: tell counts the bytes."""

    def __init__(self, out):
        self.out, self.n = out, 0

    def write(self, data) -> int:
        self.out.write(data)
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), int(time.time()), 0o644
    tar.addfile(ti, io.BytesIO(data))


def write(out, spec, sources: list[Source], folds: list[dict], quiet: bool = False) -> dict:
    """Hash, then stream the archive of `spec` (pack.Spec) to the binary file `out`; {files, bytes}."""
    total = sum(s.path.stat().st_size if s.data is None else len(s.data) for s in sources)
    with mf.Progress("pack: hashing", total, quiet=quiet) as p:
        hash_pass(sources, p)
    device = spec.device or next((f.get("device") for f in folds if f.get("device")), None)
    job = {"dataset": spec.dataset, "configuration": spec.configuration, "trainer": spec.trainer,
           "plans": spec.plans, "folds": spec.folds}
    files = [{"root": s.root, "path": s.rel, "size": s.size, "sha256": s.sha256} for s in sources]
    man = mf.build(files, folds, job, device)
    if len(man) > mf.MAX_MANIFEST_BYTES:
        raise PackError(f"cannot pack {len(files)} files: their list takes {len(man)} bytes, more than the "
                        f"{mf.MAX_MANIFEST_BYTES} unpack reads as a MANIFEST.json")
    total = sum(s.size for s in sources)
    with mf.Progress("pack: writing", total, quiet=quiet) as p, \
            tarfile.open(fileobj=_Sink(out), mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK) as tar:
        _add_bytes(tar, mf.MANIFEST, man)
        for s in sources:
            ti = tarfile.TarInfo(mf.member_name(s.root, s.rel))
            ti.size, ti.mtime, ti.mode = s.size, s.mtime, 0o644
            fh = _open(s)
            try:
                tar.addfile(ti, _Exactly(s, fh, p))
            finally:
                _close(s, fh)
            tar.members.clear()  # tarfile keeps every header it wrote; a stream needs none of them
        _add_bytes(tar, mf.MANIFEST_SUM, mf.digest_line(man))
    return {"files": len(sources), "bytes": total}
