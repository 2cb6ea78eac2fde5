"""What measuring where the epochs' time goes costs, as a share of the epoch (the issue's limit: 1 %).

Run: `python bench/diagnose_bench.py [--epoch-s 20] [--iterations 250] [--workers 12]`.
It times, on this machine: (1) the launcher's per-batch cost (TimedLoader.__next__ around a loader that
returns at once, sync included; on CUDA the synchronize finds nothing queued after nnU-Net's loss.cpu()),
(2) the once-per-epoch sidecar write (one O_APPEND write), (3) one MachineSampler.sample() over a real
process tree (this process + `--workers` idle children; NVML off here: add a few 10 us calls per GPU),
taken every 5 s by the daemon. It prints each as seconds per epoch and as a share of an epoch of
--epoch-s seconds with --iterations batches (nnU-Net's default: 250 train + 50 val iterations).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from supervisor.integrations.profiling import MachineSampler, ProfileFollower  # noqa: E402
from supervisor.trainer.epoch_timer import EpochTimer, TimedLoader  # noqa: E402


class Instant:
    def __next__(self):
        return None


def per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epoch-s", type=float, default=20.0)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--workers", type=int, default=12)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    timer = EpochTimer(str(tmp / "p.jsonl"))
    loader, bare = TimedLoader(Instant(), timer, "train"), Instant()
    batch = per_call(lambda: next(loader), 200000) - per_call(lambda: next(bare), 200000)
    rec = {"v": 1, "epoch": 1, **{k: 1.234567 for k in ("data_wait_s", "step_s", "val_s", "epoch_s", "end_s")},
           "device": "cuda:0", "worker_pids": list(range(12))}
    write = per_call(lambda: timer.write(rec), 2000)
    fol = ProfileFollower(tmp / "p.jsonl")
    poll = per_call(fol.poll, 2000)
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(a.workers)]
    try:
        s = MachineSampler(None, lambda: (os.getpid(), [k.pid for k in kids]), interval_s=0.0)
        clock = iter(range(10**9))
        sample = per_call(lambda: s.sample(float(next(clock))), 300)
    finally:
        for k in kids:
            k.kill()
            k.wait()
    e = a.epoch_s
    rows = [("launcher: TimedLoader per batch", batch, batch * a.iterations),
            ("launcher: sidecar write per epoch", write, write),
            ("daemon: MachineSampler.sample every 5 s", sample, sample * e / 5.0),
            ("daemon: ProfileFollower.poll per loop turn (1 s)", poll, poll * e / 1.0)]
    total = sum(r[2] for r in rows)
    print(f"epoch of {e:g} s, {a.iterations} batches, {a.workers} workers, {os.cpu_count()} cores")
    for name, one, per_epoch in rows:
        print(f"  {name:<50} {one * 1e6:9.1f} us/call  {per_epoch * 1e3:8.3f} ms/epoch  {100 * per_epoch / e:.4f} %")
    print(f"  {'total':<50} {'':>17}  {total * 1e3:8.3f} ms/epoch  {100 * total / e:.4f} % (limit 1 %)")
    print("  (launcher share = time added to the trainer; daemon share = CPU of the supervisor's own process)")


if __name__ == "__main__":
    main()
