"""An untrusted archive read as a tar stream in bounded memory and bounded work (what `unpack` reads through).

How it works
- `tar_stream(src)` reads the first bytes: gzip (1f 8b), bzip2 (`BZh`) and xz (fd `7zXZ` 00) streams are
  decompressed by the standard library's file readers (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile), which
  return at most the size asked for on each read however much a compressed block expands; anything else
  is passed on as a plain tar stream. tarfile is handed the plain stream (`r|`) and never decompresses
  itself: its own `r|*` reader decompresses a whole input block at once (1 MiB of a gzipped run of zeros
  is a 1 GB bytes object) and copies what is left of it on every read.
- Bounded work: the decompressed bytes may not exceed RATIO times the compressed bytes read, plus SLACK.
  RATIO is above deflate's own ceiling (~1032:1), so a gzip stream never trips it; bzip2 and xz turn a
  few bytes into gigabytes (48 MiB of zeros: 78 bytes of bzip2). Real archives (compressed arrays,
  checkpoints, logs) compress a few times at most. The guard reports the member being read (`where`).
- `Header` is the TarInfo unpack parses with: the headers that make tarfile read a whole block into
  memory (pax extended headers, GNU long names) are refused above MAX_HEADER bytes, and the kinds pack
  never writes and tarfile would accumulate without bound (pax global headers, GNU sparse maps) are
  refused outright; each as BadArchive naming the header.
- A decompressor's error (damaged or truncated input) becomes BadArchive naming the member being read.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib

from supervisor.commands.pack_manifest import BadArchive

RATIO = 1100
SLACK = 16 << 20
MAX_HEADER = 1 << 20  # pack's pax headers hold a long name and an mtime: a few hundred bytes
TAR_BUFFER = 64 << 10  # tarfile re-slices its buffer on every read: small, so a 512-byte header read stays cheap
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))


class _Counted:
    """The raw source, with the bytes read so far counted; the peeked first bytes are returned first."""

    def __init__(self, raw, head: bytes):
        self.raw, self.head, self.n = raw, head, len(head)

    def read(self, size: int = -1) -> bytes:
        if self.head:
            k = len(self.head) if size < 0 else size
            out, self.head = self.head[:k], self.head[k:]
            return out
        data = self.raw.read(size)
        self.n += len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass  # the caller owns the source


class Stream:
    """The plain tar bytes tarfile reads: `read(n)` returns at most n bytes, and at most RATIO x the
    compressed bytes read + SLACK in all (BadArchive beyond that, or on damaged input)."""

    def __init__(self, src):
        head = b""
        while len(head) < 6 and (more := src.read(6 - len(head))):
            head += more
        self.counted = _Counted(src, head)
        self.kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
        opener = {"gzip": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), "bzip2": bz2.BZ2File,
                  "xz": lzma.LZMAFile}.get(self.kind)
        self.dec = opener(self.counted) if opener else self.counted
        self.out, self.where = 0, "the archive's first header"

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.dec.read(size if size >= 0 else TAR_BUFFER)
        except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
            if self.kind is None:
                raise
            raise BadArchive(f"{self.where}: the {self.kind} stream is damaged or truncated ({e})") from None
        self.out += len(data)
        if self.kind is not None and self.out > RATIO * self.counted.n + SLACK:
            raise BadArchive(f"{self.where}: the {self.kind} stream expands to more than {RATIO} times its "
                             f"size ({self.out} bytes from {self.counted.n}): a compression bomb, refused; if "
                             f"it is genuine, decompress it yourself and unpack the plain tar")
        return data


class Header(tarfile.TarInfo):
    """tarfile's header parsing, with the headers it would read or keep without bound refused."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_SPARSE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            kind = {tarfile.GNUTYPE_SPARSE: "a GNU sparse file"}.get(self.type, "a pax global header")
            raise BadArchive(f"{self.name}: {kind}; pack writes none, refused")
        if self.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and self.size > MAX_HEADER:
            raise BadArchive(f"{self.name}: an extended header of {self.size} bytes, expected at most "
                             f"{MAX_HEADER}; refused")
        return super()._proc_member(tar)


def tar_stream(src) -> tuple[tarfile.TarFile, Stream]:
    """tarfile reading the archive in the binary stream `src` (plain, gzip, bzip2 or xz) as a stream."""
    stream = Stream(src)
    try:
        return tarfile.open(fileobj=stream, mode="r|", bufsize=TAR_BUFFER, tarinfo=Header), stream
    except tarfile.TarError as e:
        raise BadArchive(f"not a tar archive ({e})") from None
