"""checkpoints.verify against real torch checkpoints: complete, cut off mid-save, truncated, damaged, malicious.

The checkpoints are written by torch.save in the test, shaped like nnU-Net's (network_weights,
optimizer_state, grad_scaler_state, logging with numpy floats, ...); every rejection is cross-checked
against torch.load, so the test shows verify refuses exactly what --c would die on.
"""
import collections
import pickle
import zipfile

import numpy as np
import pytest
torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")
import torch.serialization as ts

from supervisor.core.criteria import choose_resume
from supervisor.integrations.checkpoints import verify


def nnunet_like_checkpoint() -> dict:
    g = torch.Generator().manual_seed(0)
    weights = collections.OrderedDict()
    for i in range(6):
        weights[f"encoder.stages.{i}.conv.weight"] = torch.randn(8, 8, 3, 3, 3, generator=g)
        weights[f"encoder.stages.{i}.norm.bias"] = torch.zeros(8)
    weights["decoder.seg.weight"] = torch.randn(4, 8, 1, 1, 1, generator=g).to(torch.bfloat16)
    weights["decoder.num_batches_tracked"] = torch.tensor(17, dtype=torch.int64)
    weights["decoder.empty"] = torch.empty(0, dtype=torch.float16)
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {i: {"momentum_buffer": torch.randn(8, 8, 3, 3, 3, generator=g)}
                                      for i in range(4)},
                            "param_groups": [{"lr": 0.00536, "momentum": 0.99, "nesterov": True,
                                              "params": list(range(4))}]},
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
        "logging": {"mean_fg_dice": [np.float64(0.31), np.float64(0.4)], "ema_fg_dice": [0.31, 0.319],
                    "dice_per_class_or_region": [[np.float32(0.9), np.float32(0.0)]] * 2,
                    "train_losses": [-0.2, -0.4], "epoch_start_timestamps": [1.0, 2.0]},
        "_best_ema": 0.319,
        "current_epoch": 2,
        "init_args": {"plans": {"configurations": {"3d_fullres": {"batch_size": 2}}}, "fold": 0,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def n_storages(path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum("/data/" in n for n in z.namelist())


def torch_load_error(path) -> str | None:
    try:
        torch.load(path, weights_only=False)
    except Exception as e:
        return str(e)
    return None


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "checkpoint_latest.pth"
    torch.save(nnunet_like_checkpoint(), p)
    return p


def rewrite(src, dst, keep=lambda info: True, replace=None):
    """Copy a torch archive entry by entry with zipfile: a valid central directory whatever we drop."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if keep(info):
                data = zin.read(info.filename)
                zout.writestr(info, (replace or {}).get(info.filename.split("/", 1)[1], data))
    return dst


def test_a_complete_checkpoint_passes(good):
    assert n_storages(good) > 15
    assert verify(good) is None
    assert torch_load_error(good) is None


def test_a_save_interrupted_between_storages_leaves_a_valid_zip_that_verify_rejects(tmp_path, monkeypatch):
    # The real mechanism: SIGINT's KeyboardInterrupt lands between two write_record calls of torch.save's
    # loop; the writer's __exit__ still writes the central directory of the records written so far.
    class InterruptAfter:
        def __init__(self, real, n):
            self.real, self.left = real, n

        def write_record(self, name, *a):
            if name.startswith("data/"):
                if self.left == 0:
                    raise KeyboardInterrupt
                self.left -= 1
            return self.real.write_record(name, *a)

        def __getattr__(self, attr):
            return getattr(self.real, attr)

    monkeypatch.setattr(ts._open_zipfile_writer_file, "__enter__", lambda self: InterruptAfter(self.file_like, 11))
    p = tmp_path / "checkpoint_latest.pth"
    with pytest.raises(KeyboardInterrupt):
        torch.save(nnunet_like_checkpoint(), p)
    monkeypatch.undo()
    names = zipfile.ZipFile(p).namelist()  # the directory is intact ...
    assert "checkpoint_latest/data/10" in names and "checkpoint_latest/data/11" not in names
    assert "failed locating file data/11" in torch_load_error(p)  # ... and --c dies on it
    assert verify(p) == "checkpoint_latest/data/11 is missing (the checkpoint was cut off while being written)"


def test_entries_dropped_from_a_rewritten_archive_are_named(good, tmp_path):
    def keep(info):  # drop data/7 onwards, like a save cut off after its 7th storage
        key = info.filename.partition("/data/")[2]
        return not (key.isdigit() and int(key) >= 7)

    bad = rewrite(good, tmp_path / "half.pth", keep=keep)
    assert "failed locating file data/7" in torch_load_error(bad)
    assert verify(bad) == "checkpoint_latest/data/7 is missing (the checkpoint was cut off while being written)"


def test_a_storage_entry_shorter_than_its_tensor_is_rejected(good, tmp_path):
    with zipfile.ZipFile(good) as z:
        full = z.read("checkpoint_latest/data/2")
    bad = rewrite(good, tmp_path / "short.pth", replace={"data/2": full[: len(full) // 2]})
    assert torch_load_error(bad) is not None
    assert verify(bad) == f"checkpoint_latest/data/2 holds {len(full) // 2} bytes, its FloatStorage needs {len(full)}"


def test_a_truncated_checkpoint_is_rejected(good):
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    assert torch_load_error(good) is not None
    assert verify(good).startswith("not a complete zip archive")


def test_a_damaged_pickle_is_reported(good, tmp_path):
    with zipfile.ZipFile(good) as z:
        pkl = z.read("checkpoint_latest/data.pkl")
    bad = rewrite(good, tmp_path / "pkl.pth", replace={"data.pkl": pkl[: len(pkl) // 2]})
    assert torch_load_error(bad) is not None
    assert verify(bad).startswith("checkpoint_latest/data.pkl does not unpickle")


def malicious_archive(tmp_path, marker):
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    payloads = [
        f"cos\nsystem\n(S'{cmd}'\ntR.",                                   # GLOBAL + REDUCE
        f"cbuiltins\nexec\n(S{code!r}\ntR.",
        f"(cos\nsystem\nS'{cmd}'\no.",                                    # MARK + OBJ
        f"(S'{cmd}'\nios\nsystem\n.",                                     # INST
        f"(S'storage'\ncos\nsystem\nS'0'\nS'cpu'\nI4\ntQ(S'{cmd}'\ntR.",  # a storage id, then called
    ]
    out = []
    for i, pkl in enumerate(payloads):
        p = tmp_path / f"evil{i}.pth"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("evil/data.pkl", pkl.encode())
            z.writestr("evil/data/0", b"\0" * 64)
        out.append(p)
    return out


def test_verify_never_executes_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    archives = malicious_archive(tmp_path, marker)
    for p in archives:
        verify(p)  # a verdict either way, never an exception
        assert not marker.exists(), p.name
    # the payloads are live: a real unpickler runs them (torch's persistent_load uses the storage type)
    class Live(pickle.Unpickler):
        def persistent_load(self, pid):
            return pid[1]

    for p in archives:
        with zipfile.ZipFile(p) as z:
            Live(z.open("evil/data.pkl")).load()
        assert marker.exists(), p.name
        marker.unlink()


def test_a_half_written_latest_is_chosen_against_and_best_resumes(good, tmp_path):
    """verify measures, the core chooses: the half-written latest goes aside, --c loads best."""
    fold = tmp_path
    torch.save(nnunet_like_checkpoint(), fold / "checkpoint_best.pth")
    rewrite(good, fold / "half.pth", keep=lambda i: not i.filename.endswith("/data/15"))
    (fold / "half.pth").replace(good)
    found = tuple((n, verify(fold / n)) for n in ("checkpoint_latest.pth", "checkpoint_best.pth"))
    pick = choose_resume(found, suspect=None)
    assert pick.resume_from == "checkpoint_best.pth"
    assert pick.bad == (("checkpoint_latest.pth",
                         "checkpoint_latest/data/15 is missing (the checkpoint was cut off while being written)"),)
    assert choose_resume(found[1:], suspect="checkpoint_best.pth").resume_from is None  # it died loading it


def test_a_bug_in_the_verifier_never_calls_a_good_checkpoint_damaged(good, monkeypatch):
    """Only a known form of damage is a verdict: when the inert unpickler itself fails on a checkpoint whose
    bytes are intact (a torch version it does not follow, a bug of ours), the file is not judged, so the
    policy never moves a good checkpoint aside; damage is still found."""
    from supervisor.integrations import checkpoints

    def broken_load(self):
        raise TypeError("Stub.__init__() takes no arguments (a verifier bug)")
    monkeypatch.setattr(checkpoints.InertUnpickler, "load", broken_load)
    assert torch_load_error(good) is None and verify(good) is None
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    assert verify(good).startswith("not a complete zip archive")
