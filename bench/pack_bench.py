#!/usr/bin/env python3
"""pack/unpack throughput and peak memory against `tar cf` + `sha256sum` on the same files.

    .venv/bin/python bench/pack_bench.py [--gb 1.0] [--dir /tmp/pack-bench]

Generates a job of --gb GB of random (incompressible) files laid out as nnU-Net's (preprocessed/
Dataset001_Bench/nnUNetPlans_3d_fullres/*.b2nd in 8 MB files, plans, split, fingerprint, a fold folder),
then runs each command in its own process and reads its peak RSS from wait4's rusage:
  pack      `cardiacseg-train pack DATASET 3d_fullres 0 -o job.tar` (hash pass + write pass)
  unpack    `cardiacseg-train unpack job.tar --skip-load-check` into empty roots (verify + place)
  baseline  `tar cf` of the same folders + `sha256sum` of every file (what the manual workflow did), and
            `tar xf` + `sha256sum -c` on the other side.
The files are in the page cache for every command (written just before): this compares CPU cost, not
the disk. Prints MB/s (data bytes / wall seconds) and peak RSS; writes nothing outside --dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DS = "Dataset001_Bench"


def make_job(root: Path, gb: float) -> int:
    pre = root / "preprocessed" / DS
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (pre / "gt_segmentations").mkdir()
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2}}}))
    for n in ("dataset.json", "dataset_fingerprint.json", "splits_final.json"):
        (pre / n).write_text("{}")
    size, total = 8 << 20, int(gb * 1e9)
    for i in range(max(1, total // size)):
        (pre / "nnUNetPlans_3d_fullres" / f"case_{i:04d}.b2nd").write_bytes(os.urandom(size))
    (root / "results" / DS / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").mkdir(parents=True)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(argv, cwd=None, env=None, shell=False) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the process tree's largest member)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=cwd, env=env, shell=shell, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {argv}")
    return wall, ru.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/pack-bench")
    a = ap.parse_args()
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    src, dst, dst2 = base / "src", base / "dst", base / "dst-tar"
    data = make_job(src, a.gb)
    env = {**os.environ, "nnUNet_preprocessed": str(src / "preprocessed"), "nnUNet_results": str(src / "results")}
    sup = [sys.executable, "-m", "supervisor"]
    rows = []
    w, rss = timed([*sup, "pack", DS, "3d_fullres", "0", "-o", str(base / "job.tar"), "--quiet"], cwd=REPO, env=env)
    rows.append(("cardiacseg-train pack", w, rss))
    w, rss = timed([*sup, "unpack", str(base / "job.tar"), "--to-preprocessed", str(dst / "preprocessed"),
                    "--to-results", str(dst / "results"), "--skip-load-check", "--quiet"], cwd=REPO)
    rows.append(("cardiacseg-train unpack", w, rss))
    w1, r1 = timed(f"tar cf {base}/plain.tar -C {src} preprocessed results", shell=True)
    w2, r2 = timed(f"cd {src} && find preprocessed results -type f -print0 | xargs -0 sha256sum > {base}/SUMS",
                   shell=True)
    rows.append(("tar cf + sha256sum", w1 + w2, max(r1, r2)))
    dst2.mkdir()
    w1, r1 = timed(f"tar xf {base}/plain.tar -C {dst2}", shell=True)
    w2, r2 = timed(f"cd {dst2} && sha256sum --quiet -c {base}/SUMS", shell=True)
    rows.append(("tar xf + sha256sum -c", w1 + w2, max(r1, r2)))
    print(f"{data / 1e9:.2f} GB in {sum(1 for _ in src.rglob('*.b2nd'))} files, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}")
    print(f"{'command':28} {'wall s':>7} {'MB/s':>7} {'peak RSS MB':>12}")
    for name, wall, rss in rows:
        print(f"{name:28} {wall:7.2f} {data / 1e6 / wall:7.0f} {rss:12.1f}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
