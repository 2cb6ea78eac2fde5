#!/usr/bin/env python3
"""pack/unpack peak memory on hostile or large input: a big fold folder, a manifest bomb, a member bomb.

    .venv/bin/python bench/pack_memory_bench.py [--mb 500] [--dir /tmp/pack-memory-bench]

Each command runs in its own process; its peak RSS comes from wait4's rusage, its time from the wall clock.
1. pack: a fold folder of --mb MB in many files (validation predictions of 1 MB, 12 MB arrays below the
   old in-memory limit, and two files of --mb/10 MB), packed with `pack DATASET 3d_fullres 0 -o job.tar`.
2. unpack of two gzipped archives, with and without --dry-run:
   a. MANIFEST.json of 32 MB: a valid header followed by empty JSON objects (`{},{},...`);
   b. one listed 256 MB member of zeros (a valid archive: its sha256 matches, so it is placed).
   The exit status is printed too: (a) must be refused (2), (b) accepted (0).
Writes nothing outside --dir, and deletes it at the end.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.pack_bench import DS, make_job  # noqa: E402
from supervisor.commands import pack_manifest as mf  # noqa: E402

SUP = [sys.executable, "-m", "supervisor"]


def timed(argv, env=None) -> tuple[int, float, float]:
    """(exit status, wall seconds, peak RSS MB), measured by /usr/bin/time: a child forked from this
    (large) process would report this process's RSS as its own peak (exec keeps the old high-water mark)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"pack-memory-bench-time-{os.getpid()}"
    p = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", str(out), *argv], cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.decode()
    if "Traceback" in err:
        sys.exit(f"traceback from {argv}:\n{err}")
    kb, wall = out.read_text().split()[-2:]
    out.unlink()
    return p.returncode, float(wall), int(kb) / 1024


def make_fold(root: Path, mb: int) -> tuple[int, int]:
    """A fold folder of about `mb` MB: (files, bytes)."""
    make_job(root, 0.0)  # plans, split, one 8 MB data file, an empty fold folder
    fold = root / "results" / DS / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    (fold / "validation").mkdir(parents=True, exist_ok=True)
    big, mid = mb // 10, 12
    sizes = [big << 20] * 2 + [mid << 20] * ((mb - 2 * big) // 2 // mid)
    sizes += [1 << 20] * (mb - sum(sizes) // (1 << 20))
    for i, size in enumerate(sizes):
        where = fold / "validation" if size == 1 << 20 else fold
        with open(where / f"case_{i:04d}.npz", "wb") as fh:
            for _ in range(size // (1 << 20)):
                fh.write(os.urandom(1 << 20))
    (fold / "training_log_2026_1_1_00_00_00.txt").write_text("Epoch 0\n" * 1000)
    return len(sizes) + 1, sum(sizes)


def gz_tar(path: Path, members) -> int:
    """A gzipped tar of (name, size, reader) written as a stream; its size in bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, size, reader in members:
            ti = tarfile.TarInfo(name)
            ti.size = size
            tar.addfile(ti, reader)
    return path.stat().st_size


class Zeros(io.RawIOBase):
    def readinto(self, b):
        b[:] = bytes(len(b))
        return len(b)

    def readable(self):
        return True


def manifest_bomb(path: Path, mb: int) -> int:
    head = b'{"format": "%s", "job": {}, "source": {}, "folds": [], "files": [' % mf.FORMAT.encode()
    n = (mb * 1_000_000 - len(head) - 3) // 3
    data = head + b"{}," * n + b"{}]}"
    return gz_tar(path, [(mf.MANIFEST, len(data), io.BytesIO(data))])


def member_bomb(path: Path, mb: int) -> int:
    size = mb << 20
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(mb):
        h.update(zeros)
    man = mf.build([{"root": "results", "path": f"{DS}/zeros.bin", "size": size, "sha256": h.hexdigest()}],
                   [], {"dataset": DS, "configuration": "3d_fullres", "trainer": "nnUNetTrainer",
                        "plans": "nnUNetPlans", "folds": []}, None)
    sumline = mf.digest_line(man)
    return gz_tar(path, [(mf.MANIFEST, len(man), io.BytesIO(man)),
                         (f"results/{DS}/zeros.bin", size, io.BufferedReader(Zeros())),
                         (mf.MANIFEST_SUM, len(sumline), io.BytesIO(sumline))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--dir", default="/tmp/pack-memory-bench")
    a = ap.parse_args()
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    rows = []
    try:
        src = base / "src"
        files, size = make_fold(src, a.mb)
        env = {**os.environ, "nnUNet_preprocessed": str(src / "preprocessed"),
               "nnUNet_results": str(src / "results")}
        rc, w, rss = timed([*SUP, "pack", DS, "3d_fullres", "0", "-o", str(base / "job.tar"), "--quiet"], env)
        rows.append((f"pack: fold folder {size / 1e6:.0f} MB in {files} files", rc, w, rss))
        (base / "job.tar").unlink()
        shutil.rmtree(src)
        for name, make, mb in (("32 MB MANIFEST.json of {}", manifest_bomb, 32),
                               ("256 MB member of zeros", member_bomb, 256)):
            arc = base / "bomb.tar.gz"
            gz = make(arc, mb)
            for dry in ((), ("--dry-run",)):
                dst = base / "dst"
                rc, w, rss = timed([*SUP, "unpack", str(arc), "--to-preprocessed", str(dst / "pre"),
                                    "--to-results", str(dst / "res"), "--skip-load-check", "--quiet", *dry])
                rows.append((f"unpack{' --dry-run' if dry else ''}: {name} ({gz / 1e3:.0f} KB gzipped)",
                             rc, w, rss))
                shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'command':64} {'exit':>4} {'wall s':>7} {'peak RSS MB':>12}")
    for name, rc, wall, rss in rows:
        print(f"{name:64} {rc:4d} {wall:7.2f} {rss:12.1f}")


if __name__ == "__main__":
    main()
