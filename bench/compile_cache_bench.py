#!/usr/bin/env python3
"""What the compile cache saves a restart: the first epoch of an attempt that compiles, cold and warm.

    .venv/bin/python bench/compile_cache_bench.py              # CPU: nnUNetTrainerDemoCompile (~10 min, 2 cores)
    .venv/bin/python bench/compile_cache_bench.py --device cuda  # a GPU: the demo trainer, nnU-Net's compile

Real nnU-Net on the demo data under the supervisor, torch.compile on, a crash injected at the start of
epoch 1 (CARDIACSEG_DEMO_CRASH_AT=1), so attempt 2 starts a new process that resumes with --c and compiles
again. nnU-Net compiles on the first forward pass, inside the first epoch, so an attempt's first epoch
time (nnU-Net's own "Epoch time") is start-up's share of a restart that compile decides: epoch 0 of attempt 1
(nothing cached) against epoch 1 of attempt 2, once with the supervisor's cache (<state_dir>/compile-cache,
the default) and once without any (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1). On a CPU nnU-Net never compiles;
nnUNetTrainerDemoCompile compiles there too (it needs a C++ compiler). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.commands import demo  # noqa: E402
from supervisor.integrations.store import StateStore  # noqa: E402


def one(root: Path, data: Path, device: str, cache: bool) -> dict:
    root.mkdir(parents=True)
    for d in ("raw", "preprocessed"):
        shutil.copytree(data / d, root / d)
    (root / "results").mkdir()
    env = {"nnUNet_compile": "true", **({} if cache else {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})}
    trainer = "nnUNetTrainerDemoCompile" if device == "cpu" else "nnUNetTrainerDemo"
    cfg = demo.demo_config(root, trainer=trainer, target=None, crash_at=1, epochs=2, extra_env=env,
                           restart={"backoff_seconds": 0, "backoff_max_seconds": 0})
    if device != "cpu":
        cfg.write_text(cfg.read_text().replace('device = "cpu"', f'device = "{device}"'))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    st = StateStore(root / "state").read() or {}
    times = {e["epoch"]: e.get("epoch_time") for e in st.get("epochs", [])}
    reasons = [a.get("reason") for a in st.get("attempts", [])]
    if r.returncode != 0 or reasons[:1] != ["crash"]:
        raise SystemExit(f"run failed (exit {r.returncode}, attempts {reasons}):\n{r.stderr[-3000:]}")
    cache_dir = root / "state" / "compile-cache"
    size = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) if cache_dir.exists() else 0
    return {"first_epoch_cold_s": times.get(0), "first_epoch_after_restart_s": times.get(1),
            "wall_s": round(wall, 1), "cache_bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="compile-cache-bench-") as tmp:
        tmp = Path(tmp)
        demo.make_dataset(tmp / "data" / "raw")
        demo.preprocess(tmp / "data")
        out = {"device": args.device,
               "with_cache": one(tmp / "with", tmp / "data", args.device, cache=True),
               "without_cache": one(tmp / "without", tmp / "data", args.device, cache=False)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
