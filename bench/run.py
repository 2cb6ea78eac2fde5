#!/usr/bin/env python3
"""Benchmarks: how fast the supervisor reacts, what it costs, and how much work a crash loses.

    make bench                      # everything (~10 min on 2 cores)
    .venv/bin/python bench/run.py --quick   # fake-trainer figures only (~3 min)

Timing figures use the fake trainer (tests/fake_trainer.py, which records when it started, crashed and got
SIGINT); overhead and lost work use real nnU-Net on the CPU (the demo dataset and trainer). Each figure is
the median and the spread (min-max, p95 where there are enough samples) over several runs. Prints a table
and writes bench/results/bench-<time>.json.
1. target reaction: from the safe point after the epoch that crossed the target (the next "Epoch N" line,
   written once that epoch's checkpoints are saved) to SIGINT arriving in the trainer. The deliberate wait
   from the crossing line to that safe point is reported separately.
2. crash -> respawn: from the trainer's death (its /proc entry turns zombie) to the new trainer's first
   Python statement (exec + ~20 ms of interpreter start-up), backoff set to 0.
3. heat -> pause: from the sensor reading over the limit to the trainer's process group stopped ('T').
4. stop latency: SIGTERM to the supervisor -> every training process gone; orphans left (goal 0).
5. overhead: the supervisor's CPU seconds per minute and peak RSS with a steady trainer; real nnU-Net
   median epoch time with the supervisor (default launcher, checkpoint every epoch) / without it (plain
   nnUNetv2_train), measured in the same run. Long run: the supervisor's CPU per epoch over the first and
   the last 500 of 10,000 fast epochs (flat: the per-epoch cost does not grow with the run).
6. lost work: real nnU-Net, SIGKILL in the middle of epoch 4 of a run whose EMA stopped improving after
   epoch 1 (a plateau): epochs redone after the restart, default launcher vs plain nnUNetv2_train.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from conftest import Job, wait_for  # noqa: E402
from supervisor.commands import demo  # noqa: E402

PY = sys.executable


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    out = {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1]}
    if len(xs) >= 10:
        out["p95"] = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return out


def events(path: Path) -> list[tuple[str, float, int]]:
    if not path.exists():
        return []
    return [(a, float(b), int(c)) for a, b, c in (ln.split() for ln in path.read_text().splitlines() if ln.strip())]


def log_time(line: str) -> float:
    return datetime.strptime(line[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def fresh(root: Path, name: str) -> Job:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return Job(d)


# ---- 1. target reaction ---------------------------------------------------------------------------------
def bench_target(root: Path, runs: int) -> dict:
    react, wait = [], []
    for i in range(runs):
        job = fresh(root, f"target{i}")
        ev = job.root / "events"
        cfg = job.config(env={"FAKE_EPOCHS": "100", "FAKE_EPOCH_S": "0.3", "FAKE_EVENTS": str(ev)},
                         target={"ema_dice": 0.33})
        rc, out = job.run(cfg, timeout=120)
        assert rc == 0, out
        st = job.state_json()
        hit = next(e["epoch"] for e in st["epochs"] if e["ema"] >= 0.33)
        log = next(job.fold.glob("training_log_*.txt")).read_text().splitlines()
        t_cross = log_time(next(ln for j, ln in enumerate(log) if "Epoch time" in ln and _epoch_of(log, j) == hit))
        t_safe = log_time(next(ln for ln in log if ln.rstrip().endswith(f"Epoch {hit + 1}")))
        t_sig = next(t for name, t, _ in events(ev) if name == "sigint")
        react.append(t_sig - t_safe)
        wait.append(t_safe - t_cross)
    return {"reaction_s": summary(react), "checkpoint_wait_s": summary(wait)}


def _epoch_of(lines: list[str], j: int) -> int:
    for ln in reversed(lines[:j]):
        if ": Epoch " in ln:
            return int(ln.split("Epoch ")[1].split()[0])
    return -1


# ---- 2. crash -> respawn -------------------------------------------------------------------------------
def bench_respawn(root: Path, runs: int) -> dict:
    """Death = the moment the trainer's /proc entry turns zombie or vanishes (watched every ~1 ms), so the
    figure is the supervisor's part: noticing, reaping the group, checking the checkpoint, exec."""
    gaps = []
    for i in range(runs):
        job = fresh(root, f"respawn{i}")
        ev = job.root / "events"
        cfg = job.config(env={"FAKE_EPOCHS": "6", "FAKE_EPOCH_S": "0.1", "FAKE_EVENTS": str(ev),
                              "FAKE_FAULT": "1:crash,2:crash,3:crash,4:crash"},
                         restart={"backoff_seconds": 0, "backoff_max_seconds": 0, "max_restarts": 10})
        p = job.start(cfg)
        dead: dict[int, float] = {}
        watching = None
        while p.poll() is None:
            if watching is None or watching in dead:
                try:
                    a = job.state_json()["attempts"][-1]
                    watching = a.get("pid") if a.get("ended_at") is None else watching
                except (OSError, ValueError, IndexError, KeyError):
                    pass
            if watching and watching not in dead and proc_state(watching) in ("Z", None):
                dead[watching] = time.time()
            time.sleep(0.001)
        out, _ = p.communicate()
        assert p.returncode == 0, out
        atts = job.state_json()["attempts"]
        # psutil's create_time rests on a boot time in whole seconds: use the trainer's own first statement
        started = {pid: t for name, t, pid in events(ev) if name == "start"}
        for prev, nxt in zip(atts, atts[1:]):
            if prev["pid"] in dead and nxt["pid"] in started:
                gaps.append(started[nxt["pid"]] - dead[prev["pid"]])
    return {"death_to_exec_s": summary(gaps)}


# ---- 3. heat -> pause -----------------------------------------------------------------------------------
def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def bench_heat(root: Path, cycles: int, poll: float) -> dict:
    job = fresh(root, "heat")
    temps, ev = job.root / "temps", job.root / "sensor-events"
    temps.write_text("0 60\n")
    cfg = job.config(env={"FAKE_EPOCHS": "100000", "FAKE_EPOCH_S": "0.2"},
                     thermal={"enabled": True, "source": "command", "poll_seconds": poll,
                              "command": [PY, str(REPO / "bench/sensor.py"), str(temps), str(ev), "85"],
                              "pause_celsius": 85, "resume_celsius": 75, "stop_celsius": 95,
                              "max_pause_minutes": 60})
    p = job.start(cfg)
    from_reading, from_write = [], []
    try:
        wait_for(lambda: (job.state / "state.json").exists() and len(job.state_json()["epochs"]) >= 1, timeout=60)
        pid = job.state_json()["attempts"][-1]["pid"]
        for _ in range(cycles):
            time.sleep(poll * 1.3)
            n = len(events(ev))
            t_write = time.time()
            temps.write_text("0 90\n")
            wait_for(lambda: proc_state(pid) == "T", timeout=10, interval=0.001)
            t_stopped = time.time()
            t_read = next(t for name, t, _ in events(ev)[n:] if name == "hot")
            from_reading.append(t_stopped - t_read)
            from_write.append(t_stopped - t_write)
            temps.write_text("0 60\n")
            wait_for(lambda: proc_state(pid) not in ("T", None), timeout=10, interval=0.005)
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    return {"poll_s": poll, "reading_to_paused_s": summary(from_reading), "file_to_paused_s": summary(from_write)}


# ---- 4. stop latency -----------------------------------------------------------------------------------
def bench_stop(root: Path, runs: int) -> dict:
    lat, orphans = [], []
    for i in range(runs):
        job = fresh(root, f"stop{i}")
        cfg = job.config(env={"FAKE_EPOCHS": "100000", "FAKE_EPOCH_S": "0.3"})
        p = job.start(cfg)
        wait_for(lambda: (job.state / "state.json").exists() and len(job.state_json()["epochs"]) >= 2, timeout=60)
        import psutil
        a = job.state_json()["attempts"][-1]
        tree = [a["pid"]] + [c.pid for c in psutil.Process(a["pid"]).children(recursive=True)]
        t0 = time.time()
        p.send_signal(signal.SIGTERM)

        def alive():
            return [x for x in tree if psutil.pid_exists(x) and psutil.Process(x).status() != psutil.STATUS_ZOMBIE]
        wait_for(lambda: not alive(), timeout=60, interval=0.002)
        lat.append(time.time() - t0)
        p.communicate(timeout=60)
        time.sleep(0.2)
        orphans.append(len(alive()))
    return {"sigterm_to_all_gone_s": summary(lat), "orphans": {"total": sum(orphans), "runs": runs}}


# ---- 5a. supervisor overhead with a steady trainer ----------------------------------------------------
def bench_overhead(root: Path, seconds: float, epoch_s: float = 0.5) -> dict:
    import psutil
    job = fresh(root, f"overhead-{epoch_s}")
    cfg = job.config(env={"FAKE_EPOCHS": "100000", "FAKE_EPOCH_S": str(epoch_s)})
    p = job.start(cfg)
    try:
        wait_for(lambda: (job.state / "state.json").exists() and len(job.state_json()["epochs"]) >= 1, timeout=60)
        sp = psutil.Process(p.pid)
        c0, t0 = sp.cpu_times(), time.time()
        time.sleep(seconds)
        c1, t1 = sp.cpu_times(), time.time()
        hwm = int(next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                       if ln.startswith("VmHWM")).split()[1])
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    cpu = (c1.user + c1.system) - (c0.user + c0.system)
    return {"window_s": round(t1 - t0, 1), "cpu_s_per_min": cpu / (t1 - t0) * 60, "peak_rss_mib": hwm / 1024,
            "epochs_per_min_of_trainer": 60 / epoch_s, "cpu_percent_of_one_core": cpu / (t1 - t0) * 100}


# ---- 5c. cost flat in the run's length -----------------------------------------------------------------
def _last_epoch(path: Path) -> int:
    """The last epoch in epochs.jsonl, read from its end (this probe must stay cheap itself)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - 512))
            tail = fh.read().splitlines()
        return json.loads(tail[-1])["epoch"] if tail else -1
    except (OSError, ValueError, KeyError, IndexError):
        return -1


def bench_long_run(root: Path, epochs: int = 10000, window: int = 500, epoch_s: float = 0.01) -> dict:
    """The supervisor's CPU per epoch over the first and the last `window` of `epochs` fast epochs. The fake
    trainer's dice is constant (FAKE_DICE_STEP 0): its EMA stops improving after a few hundred epochs, so
    it stops writing checkpoint_best.pth (whose logging lists grow with the run, as nnU-Net's do) and its own
    epoch time stays flat; the loop's timer ticks per epoch follow the trainer's epoch time, so the wall
    time per epoch of each window is reported beside the CPU."""
    import psutil
    job = fresh(root, "long-run")
    cfg = job.config(env={"FAKE_EPOCHS": str(epochs), "FAKE_EPOCH_S": str(epoch_s), "FAKE_SAVE_EVERY": "1000000",
                          "FAKE_DICE_STEP": "0"},
                     training={"expected_epochs": epochs}, target={"ema_dice": 0.99999})
    p = job.start(cfg)
    marks = {}
    want = [window, epochs - window, epochs - 1]
    try:
        sp = psutil.Process(p.pid)
        el = job.state / "epochs.jsonl"
        t0 = time.monotonic()
        c_start = None
        while want and time.monotonic() - t0 < 3600 and p.poll() is None:
            e = _last_epoch(el)
            if c_start is None and e >= 0:
                c = sp.cpu_times()
                c_start = (e, c.user + c.system, time.monotonic())
            while want and e >= want[0]:
                c = sp.cpu_times()
                marks[want.pop(0)] = (e, c.user + c.system, time.monotonic())
            time.sleep(0.02)
        hwm = int(next(ln for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                       if ln.startswith("VmHWM")).split()[1])
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    (e0, c0, w0), (e1, c1, w1) = c_start, marks[window]
    (e2, c2, w2), (e3, c3, w3) = marks[epochs - window], marks[epochs - 1]
    early, late = (c1 - c0) / max(1, e1 - e0), (c3 - c2) / max(1, e3 - e2)
    return {"epochs": epochs, "window": window, "early_ms_per_epoch": early * 1000, "late_ms_per_epoch": late * 1000,
            "late_over_early": late / early if early else None, "peak_rss_mib": hwm / 1024,
            "early_wall_ms_per_epoch": (w1 - w0) / max(1, e1 - e0) * 1000,
            "late_wall_ms_per_epoch": (w3 - w2) / max(1, e3 - e2) * 1000}


# ---- 5b/6. real nnU-Net on the CPU ------------------------------------------------------------------------
def real_root(root: Path, prepared: Path, name: str) -> Path:
    d = root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    for sub in ("raw", "preprocessed"):
        shutil.copytree(prepared / sub, d / sub)
    (d / "results").mkdir()
    return d


def epoch_times(fold: Path) -> list[float]:
    out = []
    for f in fold.glob("training_log_*.txt"):
        out += [float(ln.split("Epoch time: ")[1].split()[0]) for ln in f.read_text().splitlines() if "Epoch time:" in ln]
    return out


def bench_real_overhead(root: Path, prepared: Path, epochs: int) -> dict:
    env = {**demo.nnunet_env(root), "nnUNet_extTrainer": str(REPO / "supervisor/trainer/demo_trainers"),
           "CARDIACSEG_DEMO_EPOCHS": str(epochs)}
    plain = real_root(root, prepared, "real_plain")
    subprocess.run([demo._bin("nnUNetv2_train"), demo.DEMO_NAME, "3d_fullres", "0", "-tr", "nnUNetTrainerDemo",
                    "-device", "cpu"], env={**env, **demo.nnunet_env(plain)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sup = real_root(root, prepared, "real_supervised")
    cfg = demo.demo_config(sup, target=None, crash_at=None, epochs=epochs)
    subprocess.run([PY, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fold = "nnUNetTrainerDemo__nnUNetPlans__3d_fullres/fold_0"
    a = epoch_times(plain / "results" / demo.DEMO_NAME / fold)[1:]  # epoch 0 includes warm-up
    b = epoch_times(sup / "results" / demo.DEMO_NAME / fold)[1:]
    return {"epochs": epochs, "plain_median_s": statistics.median(a), "supervised_median_s": statistics.median(b),
            "ratio": statistics.median(b) / statistics.median(a), "plain_s": a, "supervised_s": b}


def bench_lost_work(root: Path, prepared: Path, kill_epoch: int = 4) -> dict:
    """SIGKILL in the middle of epoch `kill_epoch` with a trainer whose EMA stops improving after epoch 1
    (nnUNetTrainerDemoDecline), so stock nnU-Net's checkpoint_best is from epoch 1, as in a plateau."""
    out = {}
    for label, command in (("default_launcher", "cardiacseg-train-nnunet"), ("plain_nnUNetv2_train", "nnUNetv2_train")):
        d = real_root(root, prepared, f"lost_{label}")
        cfg = demo.demo_config(d, trainer="nnUNetTrainerDemoDecline", target=None, crash_at=None,
                               epochs=kill_epoch + 2, command=command, restart={"backoff_seconds": 0},
                               extra_env={"nnUNet_compile": "false"})
        p = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fold = d / "results" / demo.DEMO_NAME / "nnUNetTrainerDemoDecline__nnUNetPlans__3d_fullres/fold_0"
        state = d / "state" / "state.json"
        wait_for(lambda: any(f"Epoch {kill_epoch}" in f.read_text() for f in fold.glob("training_log_*.txt")),
                 timeout=600, interval=0.2)
        time.sleep(4)  # mid-epoch
        pid = json.loads(state.read_text())["attempts"][-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        p.wait(timeout=900)
        st = json.loads(state.read_text())
        resumed = st["attempts"][1]["epoch_start"] if len(st["attempts"]) > 1 else None
        ck = st["attempts"][1]["resume_from"] if len(st["attempts"]) > 1 else None
        out[label] = {"killed_in_epoch": kill_epoch, "resumed_at_epoch": resumed, "resumed_from": ck,
                      "complete_epochs_redone": None if resumed is None else kill_epoch - resumed}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fake-trainer figures only")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--only", default=None, help="comma-separated steps, e.g. overhead,overhead_5s")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cardiacseg-bench-"))
    t0 = time.monotonic()
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "date": datetime.now().isoformat(timespec="seconds")}
    steps = [("target", lambda: bench_target(root, args.runs)),
             ("respawn", lambda: bench_respawn(root, max(2, args.runs // 4))),
             ("heat", lambda: bench_heat(root, max(5, args.runs), 1.0)),
             ("stop", lambda: bench_stop(root, max(3, args.runs // 2))),
             ("overhead", lambda: bench_overhead(root, 60)),
             ("overhead_5s", lambda: bench_overhead(root, 60, epoch_s=5.0)),
             ("long_run", lambda: bench_long_run(root))]
    if not args.quick:
        prepared = root / "prepared"
        demo.make_dataset(prepared / "raw")
        demo.preprocess(prepared)
        steps += [("real_overhead", lambda: bench_real_overhead(root, prepared, 5)),
                  ("lost_work", lambda: bench_lost_work(root, prepared))]
    if args.only:
        steps = [(n, f) for n, f in steps if n in args.only.split(",")]
    for name, fn in steps:
        print(f"[bench] {name} ...", flush=True)
        res[name] = fn()
    res["wall_s"] = round(time.monotonic() - t0)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"bench-{datetime.now():%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps(res, indent=2))
    print(render(res))
    print(f"\nJSON: {path}  (wall {res['wall_s']} s)")
    shutil.rmtree(root, ignore_errors=True)
    return 0


def fmt(s: dict, scale=1.0, unit="s") -> str:
    p95 = f", p95 {s['p95'] * scale:.3f}" if "p95" in s else ""
    return f"median {s['median'] * scale:.3f} {unit} (min {s['min'] * scale:.3f}, max {s['max'] * scale:.3f}{p95}; n={s['n']})"


def render(r: dict) -> str:
    spec = [("Dice target -> SIGINT (after the safe point)", lambda: fmt(r["target"]["reaction_s"]), "p95 <= 1 s"),
            ("  deliberate wait for the checkpoint writes", lambda: fmt(r["target"]["checkpoint_wait_s"]), "reported"),
            ("trainer death -> new trainer running (backoff 0)", lambda: fmt(r["respawn"]["death_to_exec_s"]), "<= 1 s"),
            ("heat reading -> group paused", lambda: fmt(r["heat"]["reading_to_paused_s"]), "<= poll + 0.5 s"),
            ("  temperature file written -> paused", lambda: fmt(r["heat"]["file_to_paused_s"]), "reported"),
            ("SIGTERM -> every training process gone", lambda: fmt(r["stop"]["sigterm_to_all_gone_s"]), "reported"),
            ("orphaned processes after stop",
             lambda: f"{r['stop']['orphans']['total']} in {r['stop']['orphans']['runs']} runs", "0"),
            ("supervisor CPU, steady trainer, 0.5 s epochs",
             lambda: f"{r['overhead']['cpu_percent_of_one_core']:.2f} % of one core "
                     f"({r['overhead']['cpu_s_per_min']:.2f} CPU-s/min)", "(no budget; 0.5 s epochs are 10x the brief's rate)"),
            ("supervisor CPU, steady trainer, 5 s epochs",
             lambda: f"{r['overhead_5s']['cpu_percent_of_one_core']:.2f} % of one core", "<= 0.3 % (the brief's budget)"),
            ("supervisor peak RSS", lambda: f"{r['overhead']['peak_rss_mib']:.1f} MiB", "<= 50 MiB (the brief's budget)"),
            ("supervisor CPU per epoch, first / last 500 of 10,000",
             lambda: f"{r['long_run']['early_ms_per_epoch']:.2f} / {r['long_run']['late_ms_per_epoch']:.2f} ms "
                     f"(x{r['long_run']['late_over_early']:.2f}; epochs of {r['long_run']['early_wall_ms_per_epoch']:.0f} / "
                     f"{r['long_run']['late_wall_ms_per_epoch']:.0f} ms; peak RSS {r['long_run']['peak_rss_mib']:.1f} MiB)",
             "flat: x <= 1.2")]
    rows = []
    for label, value, goal in spec:
        try:
            rows.append((label, value(), goal))
        except KeyError:
            continue  # that step was not run (--only)
    if "real_overhead" in r:
        ro = r["real_overhead"]
        rows.append(("real nnU-Net epoch time, supervised / plain",
                     f"{ro['ratio']:.3f} ({ro['supervised_median_s']:.2f} s vs {ro['plain_median_s']:.2f} s)", "<= 1.02"))
        for k, v in r["lost_work"].items():
            rows.append((f"epochs redone after SIGKILL in epoch {v['killed_in_epoch']}: {k}",
                         f"{v['complete_epochs_redone']} (resumed at {v['resumed_at_epoch']} from {v['resumed_from']})", ""))
    w = max(len(a) for a, _, _ in rows)
    return "\n".join([f"{'measure'.ljust(w)}  result  [goal]"] + [f"{a.ljust(w)}  {b}  [{c}]" if c else f"{a.ljust(w)}  {b}"
                                                                for a, b, c in rows])


if __name__ == "__main__":
    sys.exit(main())
