"""Real nnU-Net 2.x on the CPU under the supervisor (synthetic dataset, tiny trainer via nnUNet_extTrainer).

The dataset is generated and preprocessed once per session (~30 s); each test trains in its own copy.
"""
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")

from conftest import REPO, LoggedPopen, wait_for
from supervisor.commands import demo
from supervisor.integrations.store import StateStore

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    demo.make_dataset(root / "raw")
    demo.preprocess(root)
    return root


@pytest.fixture
def workdir(prepared, tmp_path):
    for d in ("raw", "preprocessed"):
        shutil.copytree(prepared / d, tmp_path / d)
    (tmp_path / "results").mkdir()
    return tmp_path


def fold(root, trainer="nnUNetTrainerDemo"):
    return root / "results" / demo.DEMO_NAME / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


def state(root):
    return StateStore(root / "state").read() or {}


def start(cfg):
    return LoggedPopen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                       log_path=cfg.parent / "supervisor.log")


def group_gone(pgid):
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


def assert_ema_matches_checkpoint(st, ckpt: Path):
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    theirs = ck["logging"]["ema_fg_dice"]
    ours = {e["epoch"]: e["ema"] for e in st["epochs"]}
    assert len(theirs) == ck["current_epoch"]
    for epoch, v in enumerate(theirs):
        assert abs(ours[epoch] - float(v)) < 1e-4, (epoch, ours[epoch], v)
    return ck


def test_sigkill_mid_epoch_resumes_with_c_to_completion(workdir):
    cfg = demo.demo_config(workdir, target=None, crash_at=None, epochs=4,
                           restart={"backoff_seconds": 1})
    p = start(cfg)
    try:
        wait_for(lambda: len(state(workdir).get("epochs", [])) >= 2, timeout=240, interval=0.2,
                 what="two epochs")
        # now in epoch 2: let it get going, then kill the trainer's main process as the OOM killer would
        # ... and past its first lines: the trainer is in the middle of epoch 2's iterations
        wait_for(lambda: any(re.search(r"Epoch 2 *\n.*Current learning rate", f.read_text())
                             for f in fold(workdir).glob("training_log_*.txt")), timeout=60, what="epoch 2 going")
        first = state(workdir)["attempts"][0]
        os.kill(first["pid"], signal.SIGKILL)
        out, _ = p.communicate(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out[-5000:]
    st = state(workdir)
    a1, a2 = st["attempts"]
    assert a1["reason"] in ("crash", "host_oom") and a1["exit_code"] == -signal.SIGKILL
    assert group_gone(a1["pgid"])  # its augmentation workers did not survive it
    assert "--c" in a2["argv"] and a2["resume_from"] == "checkpoint_latest.pth"
    assert a2["epoch_start"] == 2  # at most the interrupted epoch was lost
    assert a2["reason"] == "completed" and st["sup"]["outcome"] == "completed"
    assert_ema_matches_checkpoint(st, fold(workdir) / "checkpoint_final.pth")


def test_target_stops_with_sigint_and_checkpoint_best_loads(workdir):
    target = 0.40
    cfg = demo.demo_config(workdir, target=target, crash_at=None, epochs=12)
    p = start(cfg)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-5000:]
    st = state(workdir)
    (a,) = st["attempts"]
    assert a["reason"] == "target_reached" and a["exit_code"] == -signal.SIGINT
    hit = next(e for e in st["epochs"] if e["ema"] >= target)
    assert st["epochs"][-1]["epoch"] <= hit["epoch"] + 1  # stopped at the next epoch boundary
    assert not (fold(workdir) / "checkpoint_final.pth").exists()
    ck = assert_ema_matches_checkpoint(st, fold(workdir) / "checkpoint_best.pth")
    assert ck["current_epoch"] == hit["epoch"] + 1  # best of the target epoch was fully written
    assert ck["_best_ema"] >= target


def test_real_oom_steps_batch_size_down_and_completes(workdir):
    import json
    from supervisor.integrations.plans import BACKUP_SUFFIX

    plans = workdir / "preprocessed" / demo.DEMO_NAME / "nnUNetPlans.json"
    original = plans.read_text()
    assert json.loads(original)["configurations"]["3d_fullres"]["batch_size"] == 2
    cfg = demo.demo_config(workdir, trainer="nnUNetTrainerDemoOOM", target=None, crash_at=None, epochs=2,
                           restart={"backoff_seconds": 1})
    p = start(cfg)
    out, _ = p.communicate(timeout=400)
    assert p.returncode == 0, out[-5000:]
    st = state(workdir)
    assert [a["reason"] for a in st["attempts"]] == ["cuda_oom", "completed"]
    assert json.loads(plans.read_text())["configurations"]["3d_fullres"]["batch_size"] == 1
    assert (plans.parent / (plans.name + BACKUP_SUFFIX)).read_text() == original
    ck = torch.load(fold(workdir, "nnUNetTrainerDemoOOM") / "checkpoint_final.pth", map_location="cpu",
                    weights_only=False)
    assert ck["current_epoch"] == 2


def test_a_queue_of_two_folds_then_find_best_configuration(workdir):
    import json
    cfg = demo.demo_config(workdir, target=None, crash_at=None, epochs=1)
    cfg.write_text(cfg.read_text() + "\n[queue]\nfolds = [0, 1]\nfind_best_configuration = true\n")
    p = start(cfg)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-5000:]
    q = json.loads((workdir / "state" / "queue.json").read_text())
    assert [j["status"] for j in q["jobs"]] == ["done", "done"]
    for f in (0, 1):
        d = workdir / "results" / demo.DEMO_NAME / "nnUNetTrainerDemo__nnUNetPlans__3d_fullres" / f"fold_{f}"
        assert (d / "checkpoint_final.pth").is_file() and (d / "validation" / "summary.json").is_file()
    fb = q["find_best_configuration"]
    assert fb["exit_code"] == 0, fb
    assert (workdir / "results" / demo.DEMO_NAME / "inference_instructions.txt").is_file()
