"""`cardiacseg-train demo`: real nnU-Net on the CPU under the supervisor, on a synthetic dataset.

How it works: (1) write a tiny synthetic "cardiac" dataset to <dir>/raw (6 volumes of 32^3 with three
nested foreground structures, the third one tiny: like a small structure in real data, it stays at Dice 0
for the first epochs);
(2) run nnUNetv2_plan_and_preprocess for 3d_fullres; (3) write <dir>/config.toml with the tiny demo
trainer (supervisor/trainer/demo_trainers via nnUNet_extTrainer), an injected crash (a RuntimeError) at epoch 2 and
a reachable EMA target; (4) run `cardiacseg-train run` on it; (5) print `cardiacseg-train status`.
Steps 1-2 are skipped when their output already exists. The same helpers build the end-to-end tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEMO_ID = 900
DEMO_NAME = f"Dataset{DEMO_ID:03d}_DemoCardiac"
DEMO_TARGET = 0.42
DEMO_EPOCHS = 10  # nnUNetTrainerDemo's num_epochs (CARDIACSEG_DEMO_EPOCHS)
DEMO_ITERS = 6    # its training iterations per epoch (CARDIACSEG_DEMO_ITERS, the trainer's default)


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def make_dataset(raw: Path, n_cases: int = 6, size: int = 32, seed: int = 0) -> Path:
    import nibabel as nib
    import numpy as np

    ds = raw / DEMO_NAME
    if (ds / "dataset.json").exists():
        return ds
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    g = np.indices((size, size, size)).astype(np.float32)
    for i in range(n_cases):
        c = size / 2 + rng.uniform(-3, 3, 3)
        r = np.sqrt(sum((g[k] - c[k]) ** 2 for k in range(3)))
        lab = np.zeros((size,) * 3, np.uint8)
        lab[r < size * 0.35] = 2          # "myocardium" shell
        lab[r < size * 0.22] = 1          # "left ventricle" blood pool
        rv = np.sqrt(sum((g[k] - (c[k] + (size * 0.3 if k == 0 else 0))) ** 2 for k in range(3)))
        lab[rv < 1.6] = 3                 # a tiny "right ventricle": hard to learn in a few epochs
        img = lab.astype(np.float32) * 40 + rng.normal(0, 15, lab.shape).astype(np.float32)
        aff = np.eye(4)
        nib.save(nib.Nifti1Image(img, aff), ds / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), ds / "labelsTr" / f"case_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "LV": 1, "MYO": 2, "RV": 3},
        "numTraining": n_cases, "file_ending": ".nii.gz"}, indent=2))
    return ds


def nnunet_env(root: Path) -> dict:
    return {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
            "nnUNet_compile": "false"}


def preprocess(root: Path) -> Path:
    plans = root / "preprocessed" / DEMO_NAME / "nnUNetPlans.json"
    if plans.exists():
        return plans
    for d in ("raw", "preprocessed", "results"):
        (root / d).mkdir(parents=True, exist_ok=True)
    subprocess.run([_bin("nnUNetv2_plan_and_preprocess"), "-d", str(DEMO_ID), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1"], env=nnunet_env(root), check=True,
                   stdout=subprocess.DEVNULL)
    return plans


def demo_config(root: Path, *, trainer="nnUNetTrainerDemo", command="cardiacseg-train-nnunet",
                target: float | None = DEMO_TARGET,
                crash_at: int | None = 2, epochs: int = DEMO_EPOCHS, state_dir: str = "state",
                extra_env: dict | None = None, restart: dict | None = None) -> Path:
    from supervisor.trainer.demo_trainers import DIR

    env = {"nnUNet_extTrainer": str(DIR), "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "false", "CARDIACSEG_DEMO_EPOCHS": str(epochs), **(extra_env or {})}
    if crash_at is not None:
        env["CARDIACSEG_DEMO_CRASH_AT"] = str(crash_at)
    restart = {"backoff_seconds": 2, "backoff_max_seconds": 10, "max_restarts": 5,
               "window_minutes": 60, **(restart or {})}
    q = json.dumps
    lines = [
        "# Written by `cardiacseg-train demo`: real nnU-Net on the CPU, synthetic data.",
        "[training]",
        f"command = [{q(_bin(command))}]",
        f"dataset = {q(DEMO_NAME)}", 'configuration = "3d_fullres"', "fold = 0",
        f"trainer = {q(trainer)}", 'device = "cpu"', f"expected_epochs = {epochs}",
        "", "[paths]", 'raw = "raw"', 'preprocessed = "preprocessed"', 'results = "results"',
        f"state_dir = {q(state_dir)}",
        "", "[environment]", *[f"{k} = {q(v)}" for k, v in env.items()],
        "", "[restart]", *[f"{k} = {v}" for k, v in restart.items()],
        "", "[stop]", "timeout_seconds = 60", "checkpoint_wait_seconds = 120",
    ]
    if target is not None:
        lines += ["", "[target]", f"ema_dice = {target}"]
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(args) -> int:
    root = Path(args.dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"[demo] working folder {root}", flush=True)
    print("[demo] 1/4 synthetic dataset (6 volumes of 32^3, 3 structures)", flush=True)
    make_dataset(root / "raw")
    print("[demo] 2/4 nnUNetv2_plan_and_preprocess (about 30-60 s on 2 cores)", flush=True)
    preprocess(root)
    cfg = demo_config(root, crash_at=None if args.no_crash else 2)
    print(f"[demo] 3/4 supervising nnUNetv2_train on the CPU: trainer nnUNetTrainerDemo ({DEMO_EPOCHS} epochs of "
          f"{DEMO_ITERS} training and 2 validation iterations, 1 augmentation worker), crash injected at epoch 2, "
          f"target EMA Dice {DEMO_TARGET} (config: {cfg})", flush=True)
    cmd = [sys.executable, "-m", "supervisor"]
    rc = subprocess.call([*cmd, "run", "--config", str(cfg)])
    print(f"[demo] supervisor exited with {rc} after {time.monotonic() - t0:.0f} s; 4/4 status:", flush=True)
    subprocess.call([*cmd, "status", "--config", str(cfg)])
    print(next_steps(cfg), flush=True)
    return rc


def next_steps(cfg: Path) -> str:
    """The exact commands to go on with: `make demo` installs into a venv, which is not on PATH."""
    exe, conf = _here(_bin("cardiacseg-train")), _here(str(cfg))
    steps = [(f"{exe} status --config {conf}", "where it stands (works while `run` runs, too)"),
             (f"{exe} check --config {conf}", "everything `run` would trip over"),
             (f"{exe} plot --config {conf} -o {_here(str(cfg.parent / 'progress.png'))}", "the progress picture"),
             (f"{exe} run --config {conf}", "again: it says the target is already reached"),
             (f"rm -rf {_here(str(cfg.parent))}", "to start over")]
    width = max(len(c) for c, _ in steps)
    return "\n".join([f"[demo] next (the command is in the venv, not on PATH unless you "
                      f"`source {_here(str(Path(exe).parent))}/activate`):"]
                     + [f"  {c:<{width}}  # {why}" for c, why in steps])


def _here(path: str) -> str:
    """`path` relative to the current folder when it is below it (what a person types), else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
