"""Real nnU-Net on the CPU: pack a supervised training mid-run, unpack it into empty roots elsewhere, and the
supervisor there continues with `--c` at the packed epoch with the same EMA history."""
import json
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest
torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")

from conftest import REPO, LoggedPopen, wait_for
from supervisor.commands import demo
from supervisor.integrations.store import StateStore

pytestmark = pytest.mark.e2e
TR = "nnUNetTrainerDemo__nnUNetPlans__3d_fullres"


def fold(root):
    return root / "results" / demo.DEMO_NAME / TR / "fold_0"


def state(root):
    return StateStore(root / "state").read() or {}


def run(root):
    return LoggedPopen([sys.executable, "-m", "supervisor", "run", "--config", str(root / "config.toml")],
                       cwd=REPO, log_path=root / "supervisor.log")


def test_pack_mid_training_unpack_elsewhere_and_resume_at_the_packed_epoch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    demo.make_dataset(a / "raw")
    demo.preprocess(a)
    demo.demo_config(a, target=None, crash_at=None, epochs=8)
    p = run(a)
    try:
        wait_for(lambda: len(state(a).get("epochs", [])) >= 2, timeout=300, interval=0.2, what="two epochs")
        assert p.poll() is None  # still training while it is packed
        archive = tmp_path / "job.tar"
        r = subprocess.run([sys.executable, "-m", "supervisor", "pack", "--config", str(a / "config.toml"), "-o",
                            str(archive)], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    with tarfile.open(archive) as tar:
        man = json.loads(tar.extractfile(tar.next()).read())
    (packed,) = man["folds"]
    assert packed["resume"] == "checkpoint_latest.pth" and packed["epoch"] >= 2
    epoch = packed["epoch"]

    b.mkdir()
    demo.demo_config(b, target=None, crash_at=None, epochs=epoch + 1)  # one more epoch on the "new machine"
    r = subprocess.run([sys.executable, "-m", "supervisor", "unpack", str(archive), "--config", str(b / "config.toml")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"fold 0: checkpoint_latest.pth, epoch {epoch}, EMA {packed['ema']:.3f}" in r.stdout
    assert not (b / "raw").exists() or not any((b / "raw").iterdir())  # only what --c needs came over
    before = torch.load(fold(b) / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert before["current_epoch"] == epoch
    shutil.rmtree(a)  # the old machine is gone: nothing may still point there

    p = run(b)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-5000:]
    (att,) = state(b)["attempts"]
    assert "--c" in att["argv"] and att["resume_from"] == "checkpoint_latest.pth"
    assert att["epoch_start"] == epoch and att["reason"] == "completed"
    after = torch.load(fold(b) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert after["current_epoch"] == epoch + 1
    hist = [float(x) for x in before["logging"]["ema_fg_dice"]]
    assert [float(x) for x in after["logging"]["ema_fg_dice"][:epoch]] == hist  # same EMA history
    print(f"\nROUND TRIP: packed at epoch {epoch} (checkpoint_latest.pth, EMA {hist[-1]:.4f}); resumed with --c "
          f"at epoch {att['epoch_start']}; finished at epoch {after['current_epoch']}, EMA history "
          f"{[round(x, 4) for x in after['logging']['ema_fg_dice']]}")
