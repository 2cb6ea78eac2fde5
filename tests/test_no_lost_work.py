"""No lost work: corrupt checkpoints, hangs, divergence, plateau, and atomic checkpoint writes."""
import os
import signal
import subprocess
import sys
import time

import pytest
torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")

from conftest import REPO, wait_for
from supervisor.integrations import checkpoints


def run_until_epochs(job, cfg, n):
    p = job.start(cfg)
    job.wait_epochs(n, timeout=60)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out


def test_truncated_latest_falls_back_to_best_and_is_moved_aside(job):
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2"})
    run_until_epochs(job, cfg, 4)
    latest = job.fold / "checkpoint_latest.pth"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # a kill during a non-atomic save
    cfg = job.config(env={"FAKE_EPOCHS": "8", "FAKE_EPOCH_S": "0.1"})
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    a = st["attempts"][-1]
    assert a["resume_from"] == "checkpoint_best.pth" and a["reason"] == "completed"
    moved = list(job.fold.glob("checkpoint_latest.pth.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == data[: len(data) // 2]  # kept, not deleted
    assert "checkpoint_moved_aside" in out and "not a complete zip archive" in out


@pytest.mark.parametrize("allow", [False, True])
def test_no_valid_checkpoint_gives_up_or_starts_fresh(job, allow):
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2"})
    run_until_epochs(job, cfg, 2)
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        (job.fold / name).write_bytes(b"\0" * 1000)
    cfg = job.config(env={"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.1"},
                     checkpoint={"allow_fresh_start": allow, "fresh_start_max_minutes": 0})
    rc, out = job.run(cfg)
    st = job.state_json()
    assert len(list(job.fold.glob("*.corrupt-*"))) == 2
    if allow:
        assert rc == 0, out
        assert st["attempts"][-1]["resume_from"] is None and "--c" not in st["attempts"][-1]["argv"]
        assert st["sup"]["outcome"] == "completed"
    else:
        assert rc == 3, out
        assert st["sup"]["outcome"] == "gave_up" and "allow_fresh_start" in st["sup"]["message"]


def test_checkpoint_the_last_attempt_died_on_is_moved_aside_even_if_the_zip_looks_fine(job):
    # torch.load can fail on a structurally valid zip (a bad pickle): the trainer's own error is the evidence
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2"})
    run_until_epochs(job, cfg, 3)
    import zipfile
    latest = job.fold / "checkpoint_latest.pth"
    with zipfile.ZipFile(latest) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = b"not a pickle"
    with zipfile.ZipFile(latest, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    assert "data.pkl does not unpickle" in checkpoints.verify(latest)
    # with verification off the trainer dies loading it: the file it died on is moved aside all the same
    rc, out = job.run(job.config(env={"FAKE_EPOCHS": "6", "FAKE_EPOCH_S": "0.1"}, checkpoint={"verify": False}))
    assert rc == 0, out
    reasons = [a["reason"] for a in job.state_json()["attempts"]]
    assert reasons[-2:] == ["corrupt_checkpoint", "completed"]
    assert job.state_json()["attempts"][-1]["resume_from"] == "checkpoint_best.pth"
    assert len(list(job.fold.glob("checkpoint_latest.pth.corrupt-*"))) == 1


def test_hang_is_detected_stopped_and_restarted(job):
    cfg = job.config(env={"FAKE_EPOCHS": "5", "FAKE_EPOCH_S": "0.2", "FAKE_FAULT": "3:hang"},
                     hang={"timeout_minutes": 0.05, "first_epoch_minutes": 1, "idle_cpu_percent": 20})
    t0 = time.monotonic()
    rc, out = job.run(cfg, timeout=120)
    assert rc == 0, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["hang", "completed"]
    hung = st["attempts"][0]
    # stopped within limit (3 s) + two CPU samples (5 s each) + stop time, not after minutes
    assert hung["ended_at"] - hung["started_at"] < 30
    assert "hang_detected" in out and st["attempts"][1]["resume_from"] == "checkpoint_latest.pth"
    assert time.monotonic() - t0 < 90


def test_nan_loss_diverges_and_is_not_restarted(job):
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_FAULT": "2:nan"}, target={"max_nonfinite_epochs": 3})
    rc, out = job.run(cfg)
    assert rc == 3, out
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["diverged"]
    assert st["sup"]["outcome"] == "diverged" and "not restarted" in st["sup"]["message"].lower()
    assert st["epochs"][-1]["epoch"] in (4, 5)  # stopped after the third non-finite epoch (2, 3, 4)


def test_plateau_stops_like_a_target(job):
    cfg = job.config(env={"FAKE_EPOCHS": "50", "FAKE_DICE_STEP": "-0.02"}, target={"patience_epochs": 3})
    rc, out = job.run(cfg)
    assert rc == 0, out
    st = job.state_json()
    assert st["sup"]["outcome"] == "plateau" and st["attempts"][-1]["reason"] == "plateau"
    assert st["epochs"][-1]["epoch"] <= 4


# ---- the launcher's atomic checkpoint write, under a real SIGKILL and a real SIGINT -------------------
WRITER = """
import sys, time, torch
from supervisor.trainer import launcher
path = sys.argv[1]
big = torch.arange(60_000_000, dtype=torch.float32)  # ~240 MB: a write takes a while
print("ready", flush=True)
i = 0
while True:
    i += 1
    launcher.atomic_torch_save({"i": i, "w": big}, path)
"""


def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({"i": 0, "w": torch.zeros(3)}, path)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    # kill while a temp file is being written (not between writes)
    wait_for(lambda: any(x.name.startswith(".checkpoint_latest.pth.tmp-") for x in tmp_path.iterdir()),
             timeout=60, interval=0.001, what="a write in progress")
    p.kill()
    p.wait()
    ck = torch.load(path, weights_only=False)
    assert ck["i"] == 0 or ck["w"].numel() == 60_000_000  # the old file or a complete new one
    assert checkpoints.verify(path) is None
    left = [x.name for x in tmp_path.iterdir() if ".tmp-" in x.name]
    assert left and checkpoints.stale_temp_files(tmp_path) == left  # ours to tidy (the writer is dead)


def test_sigint_during_a_write_waits_for_the_write_then_stops(tmp_path):
    path = tmp_path / "ck.pth"
    code = WRITER.replace("from supervisor.trainer import launcher",
                          "from supervisor.trainer import launcher; import signal; "
                          "[signal.signal(s, launcher._handler) for s in (signal.SIGINT, signal.SIGTERM)]")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    wait_for(lambda: any(".tmp-" in x.name for x in tmp_path.iterdir()), timeout=60, interval=0.001,
             what="a write in progress")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "after the checkpoint write" in err
    assert not [x for x in tmp_path.iterdir() if ".tmp-" in x.name]  # the write finished and was renamed
    assert torch.load(path, weights_only=False)["w"].numel() == 60_000_000


def test_verify_spots_truncation_and_zeroed_bytes(tmp_path):
    p = tmp_path / "c.pth"
    torch.save({"w": torch.arange(100000)}, p)
    assert checkpoints.verify(p) is None
    good = p.read_bytes()
    p.write_bytes(good[:-100])
    assert "zip" in checkpoints.verify(p)
    mid = len(good) // 2
    p.write_bytes(good[:mid] + b"\0" * 64 + good[mid + 64:])
    assert checkpoints.verify(p) is not None
    p.write_bytes(b"")
    assert checkpoints.verify(p) is not None


EXPORTER = """
import os, sys, time, multiprocessing
from supervisor.trainer import launcher


def export(i):
    open(os.path.join(sys.argv[1], f"worker-{i}"), "w").close()
    time.sleep(300)


def validate():
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # nnU-Net's export pool
        res = pool.map_async(export, range(2))
        res.get(300)


if __name__ == "__main__":
    launcher.quiet_spawned_children()
    launcher.install_signal_handlers()
    launcher.run_until_stopped(validate)
"""


def test_a_stop_during_the_final_validations_export_workers_is_one_line(tmp_path):
    """SIGINT to the trainer's whole group while nnU-Net's spawn Pool exports predictions: one line from the
    trainer, no KeyboardInterrupt traceback from each export worker, and the trainer dies by SIGINT."""
    script = tmp_path / "exporter.py"
    script.write_text(EXPORTER)
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    wait_for(lambda: len(list(tmp_path.glob("worker-*"))) == 2, timeout=120, what="both export workers busy")
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cardiacseg-train-nnunet: stopped by SIGINT"), err
    assert p.returncode == -signal.SIGINT


def test_a_stop_while_the_launcher_imports_torch_is_one_line(tmp_path):
    """SIGINT while the launcher is still importing torch and nnU-Net (seconds at every start): the same one
    line as a stop in epoch 500, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "supervisor.trainer.launcher", "Dataset999_None", "3d_fullres", "0"],
                         cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "nnUNet_raw": str(tmp_path), "nnUNet_preprocessed": str(tmp_path),
                              "nnUNet_results": str(tmp_path)})

    def importing_torch():
        try:
            return "libtorch" in open(f"/proc/{p.pid}/maps").read()
        except OSError:
            return False
    wait_for(importing_torch, timeout=120, interval=0.005, what="torch being imported")
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert "Traceback" not in err, err
    assert "cardiacseg-train-nnunet: stopped by SIGINT before the first epoch" in err, err
    assert p.returncode == -signal.SIGINT


def test_the_only_checkpoint_truncated_early_starts_fresh_and_says_what_it_lost(job):
    """Stock nnUNetv2_train (no checkpoint_latest before epoch 50) killed while it writes its first
    checkpoint_best.pth: the only checkpoint is truncated. A fresh start loses seconds here, below
    checkpoint.fresh_start_max_minutes: it starts at epoch 0 and says so; with a limit of 0 it gives up."""
    cfg = job.config(env={"FAKE_EPOCHS": "200", "FAKE_EPOCH_S": "0.2", "FAKE_SAVE_EVERY": "1000"})
    run_until_epochs(job, cfg, 2)
    latest = job.fold / "checkpoint_latest.pth"
    assert not latest.exists()  # best only, as stock nnU-Net early in a run
    best = job.fold / "checkpoint_best.pth"
    best.write_bytes(best.read_bytes()[:1000])
    cfg = job.config(env={"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.1", "FAKE_SAVE_EVERY": "1000"})
    rc, out = job.run(cfg)
    assert rc == 0, out[-3000:]
    st = job.state_json()
    assert st["attempts"][-1]["resume_from"] is None and st["sup"]["outcome"] == "completed"
    assert "fresh_start" in out and "at most checkpoint.fresh_start_max_minutes = 30" in out
    assert len(list(job.fold.glob("checkpoint_best.pth.corrupt-*"))) == 1


def test_a_hung_final_validation_is_rerun_with_val_and_fewer_export_processes(job):
    """After "Training done." nnU-Net's export pool can deadlock: nothing prints, nothing runs. Idle past
    hang.final_validation_minutes, it is stopped and the validation alone is rerun (--val, from
    checkpoint_final.pth) with half nnU-Net's 8 export processes; the run then completes."""
    cfg = job.config(env={"FAKE_EPOCHS": "3", "FAKE_EPOCH_S": "0.1", "FAKE_VAL_HANG": "1"},
                     hang={"final_validation_minutes": 0.1})
    rc, out = job.run(cfg, timeout=180)
    assert rc == 0, out[-3000:]
    st = job.state_json()
    assert [a["reason"] for a in st["attempts"]] == ["hang", "completed"], st["attempts"]
    last = st["attempts"][-1]
    assert last["validate_only"] and "--val" in last["argv"] and "--c" not in last["argv"]
    assert "validation_hang_detected" in out and "export processes (nnUNet_def_n_proc): 4" in out
    assert (job.fold / "validation" / "summary.json").is_file() and st["sup"]["outcome"] == "completed"
