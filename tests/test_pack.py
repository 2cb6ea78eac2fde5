"""pack/unpack on real files and real tar archives: round trip, refusals with nothing placed, snapshots."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
torch = pytest.importorskip("torch", reason="torch is not installed: this module's tests use real torch checkpoints")

from conftest import REPO
from supervisor.commands import pack_manifest as mf
from supervisor.commands import pack
from supervisor.commands import pack_stream
from supervisor.commands import unpack

DS = "Dataset001_Fake"
TR = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def save_checkpoint(path: Path, epoch: int, emas: list[float]) -> None:
    import numpy as np
    torch.save({"network_weights": {"w": torch.arange(1000, dtype=torch.float32)}, "current_epoch": epoch,
                "logging": {"ema_fg_dice": [np.float64(e) for e in emas]}, "_best_ema": np.float64(max(emas)),
                "init_args": {"device": torch.device("cpu")}, "trainer_name": "nnUNetTrainer"}, path)


@pytest.fixture
def src(tmp_path):
    return make_src(tmp_path)


def make_src(tmp_path: Path) -> Path:
    """A source machine's nnUNet_preprocessed and nnUNet_results, laid out as nnU-Net 2.8.1 leaves them."""
    root = tmp_path / "src"
    pre = root / "preprocessed" / DS
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (pre / "gt_segmentations").mkdir()
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2}}}))
    for n in ("dataset.json", "dataset_fingerprint.json"):
        (pre / n).write_text("{}")
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["case_000"], "val": ["case_001"]},
                                                       {"train": ["case_001"], "val": ["case_000"]}]))
    for i in range(3):
        (pre / "nnUNetPlans_3d_fullres" / f"case_{i:03d}.b2nd").write_bytes(os.urandom(50_000 + i))
        (pre / "gt_segmentations" / f"case_{i:03d}.nii.gz").write_bytes(os.urandom(1000))
    for fold in (0, 1):
        fd = root / "results" / DS / TR / f"fold_{fold}"
        fd.mkdir(parents=True)
        save_checkpoint(fd / "checkpoint_latest.pth", 7 + fold, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.683])
        save_checkpoint(fd / "checkpoint_best.pth", 5, [0.1, 0.2, 0.3, 0.4, 0.5])
        (fd / "training_log_2026_1_2_03_04_05.txt").write_text("Epoch 6\n")
        (fd / "progress.png").write_bytes(os.urandom(3000))
        (fd / "debug.json").write_text("{}")
    (root / "results" / DS / TR / "plans.json").write_text("{}")
    return root


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args, env=None, stdin=None, input=None):
    return subprocess.run([sys.executable, "-m", "supervisor", *map(str, args)], cwd=REPO, capture_output=True,
                          env={**os.environ, **(env or {})}, stdin=stdin, input=input)


def nnunet_env(root: Path) -> dict:
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / "results")}


def to_args(dst: Path) -> list[str]:
    return ["--to-preprocessed", dst / "preprocessed", "--to-results", dst / "results"]


@pytest.fixture
def archive(src, tmp_path) -> Path:
    return make_archive(src, tmp_path)


def make_archive(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "job.tar"
    r = cli("pack", "1", "3d_fullres", "0", "-o", out, env=nnunet_env(src))
    assert r.returncode == 0, r.stderr.decode()
    return out


def test_round_trip_restores_every_byte_and_reports_what_c_resumes_from(archive, src, tmp_path):
    dst = tmp_path / "dst"
    r = cli("unpack", archive, *to_args(dst))
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    want = {k: v for k, v in files_under(src).items() if "/fold_1/" not in k}
    got = files_under(dst)
    saved = f"results/{DS}/{TR}/{unpack.SAVED_MANIFEST}"
    assert json.loads(got.pop(saved))["job"]["dataset"] == DS
    assert got == want
    assert "fold 0: checkpoint_latest.pth, epoch 7, EMA 0.683" in out


def test_manifest_comes_first_and_lists_every_member_with_its_sha256(archive, src):
    import hashlib
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert members[0].name == mf.MANIFEST and members[-1].name == mf.MANIFEST_SUM
        doc = json.loads(tar.extractfile(members[0]).read())
        listed = [mf.member_name(f["root"], f["path"]) for f in doc["files"]]
        assert listed == [m.name for m in members[1:-1]]
        for f in doc["files"]:
            data = (src / f["root"] / f["path"]).read_bytes()
            assert (f["size"], f["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert {"splits_final.json", "dataset_fingerprint.json", "nnUNetPlans.json", "dataset.json"} <= \
        {Path(f["path"]).name for f in doc["files"] if f["root"] == "preprocessed"}
    (fold,) = doc["folds"]
    assert (fold["resume"], fold["epoch"], round(fold["ema"], 3)) == ("checkpoint_latest.pth", 7, 0.683)
    assert doc["source"]["numpy"] and doc["source"]["torch"] and doc["source"]["device"] == "cpu"


def test_pack_folds_streams_to_stdout_into_unpack_from_stdin(src, tmp_path):
    dst = tmp_path / "dst"
    p = subprocess.Popen([sys.executable, "-m", "supervisor", "pack", DS, "3d_fullres", "0", "--folds", "0,1",
                          "-o", "-"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **nnunet_env(src)})
    r = cli("unpack", "-", *to_args(dst), "--skip-load-check", stdin=p.stdout)
    p.stdout.close()
    assert p.wait() == 0, p.stderr.read().decode()
    assert r.returncode == 0, r.stderr.decode()
    assert (dst / "results" / DS / TR / "fold_1" / "checkpoint_latest.pth").read_bytes() == \
        (src / "results" / DS / TR / "fold_1" / "checkpoint_latest.pth").read_bytes()


def test_pack_folds_all_is_every_fold_of_the_split_and_a_fold_it_lacks_is_refused(src, tmp_path):
    r = cli("pack", DS, "3d_fullres", "0", "--folds", "all", "-o", tmp_path / "job.tar", "--quiet",
            env=nnunet_env(src))
    assert r.returncode == 0, r.stderr.decode()
    assert "pack: fold 0:" in r.stderr.decode() and "pack: fold 1:" in r.stderr.decode()
    r = cli("pack", DS, "3d_fullres", "0", "--folds", "0-2", "-o", tmp_path / "two.tar", env=nnunet_env(src))
    split = src / "preprocessed" / DS / "splits_final.json"
    assert r.returncode == 2 and r.stderr.decode().strip() == (
        f"cardiacseg-train pack: --folds 0-2: fold 2 does not exist: {split} has 2 folds (0-1)")
    assert not list(tmp_path.glob("two.tar*"))


def test_pack_refuses_a_missing_split_and_writes_no_archive(src, tmp_path):
    (src / "preprocessed" / DS / "splits_final.json").unlink()
    r = cli("pack", DS, "3d_fullres", "0", "-o", tmp_path / "job.tar", env=nnunet_env(src))
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err
    assert "splits_final.json not found" in err and "NEW split" in err
    assert list(tmp_path.glob("*job.tar*")) == []


def test_an_existing_archive_is_moved_aside_not_overwritten(src, tmp_path):
    out = tmp_path / "job.tar"
    out.write_bytes(b"my old archive")
    assert cli("pack", DS, "3d_fullres", "0", "-o", out, env=nnunet_env(src)).returncode == 0
    (old,) = tmp_path.glob("job.tar.previous-*")
    assert old.read_bytes() == b"my old archive" and tarfile.is_tarfile(out)


# ---- hostile archives, built here from a good one ----------------------------------------------------
def rebuild(archive: Path, out: Path, edit) -> Path:
    """Copy archive's members through edit(members) -> [(TarInfo, bytes | None)]."""
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in edit(members):
            if data is not None:
                ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return out


def resign(members):
    """Recompute MANIFEST.json.sha256 after an edit of the manifest (a consistent forgery of the list)."""
    man = next(d for m, d in members if m.name == mf.MANIFEST)
    return [(m, mf.digest_line(man) if m.name == mf.MANIFEST_SUM else d) for m, d in members]


def flip_byte(members):
    out = []
    for m, d in members:
        if m.name.endswith("checkpoint_latest.pth"):
            d = bytearray(d)
            d[len(d) // 2] ^= 0x01
            d = bytes(d)
        out.append((m, d))
    return out


def edit_manifest(members):
    return [(m, d.replace(b'"python"', b'"pythom"') if m.name == mf.MANIFEST else d) for m, d in members]


def drop_member(members):
    return [(m, d) for m, d in members if not m.name.endswith("debug.json")]


def extra(ti_kwargs, data=None):
    def edit(members):
        ti = tarfile.TarInfo(ti_kwargs.pop("name"))
        for k, v in ti_kwargs.items():
            setattr(ti, k, v)
        return [*members[:2], (ti, data), *members[2:]]
    return edit


def listed_traversal(members):
    """The manifest itself lists a path with `..` (and the sum is recomputed to match)."""
    man = json.loads(members[0][1])
    man["files"][0]["path"] = "../../etc/cron.d/x"
    members[0] = (members[0][0], json.dumps(man).encode())
    return resign(members)


CASES = {
    "flipped_byte": (flip_byte, "checkpoint_latest.pth: sha256 differs from MANIFEST.json"),
    "missing_manifest": (lambda ms: ms[1:], "the first member must be MANIFEST.json"),
    "edited_manifest": (edit_manifest, "MANIFEST.json: its sha256 differs from MANIFEST.json.sha256"),
    "listed_but_absent": (lambda ms: resign(drop_member(ms)), "debug.json: listed in MANIFEST.json but not in the archive"),
    "dotdot_member": (extra({"name": "results/../../evil.sh"}, b"x"), "results/../../evil.sh: escapes its root"),
    "absolute_member": (extra({"name": "/tmp/evil.sh"}, b"x"), "/tmp/evil.sh: escapes its root"),
    "symlink_member": (extra({"name": f"results/{DS}/link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
                       f"results/{DS}/link: a symbolic link; pack writes regular files only"),
    "device_member": (extra({"name": f"results/{DS}/dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
                      f"results/{DS}/dev: a device"),
    "unlisted_member": (extra({"name": f"results/{DS}/extra.txt"}, b"x"), "extra.txt: not listed in MANIFEST.json"),
    "listed_traversal": (listed_traversal, "is a path with '..'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_archive_is_refused_with_the_member_named_and_nothing_placed(archive, tmp_path, case):
    edit, message = CASES[case]
    bad = rebuild(archive, tmp_path / "bad.tar", edit)
    dst = tmp_path / "dst"
    keep = dst / "results" / DS / TR / "fold_0" / "checkpoint_latest.pth"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"what the user had")
    r = cli("unpack", bad, *to_args(dst))
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert message in err and "nothing was placed" in err, err
    assert files_under(dst) == {f"results/{DS}/{TR}/fold_0/checkpoint_latest.pth": b"what the user had"}
    assert not any(p.name.startswith(".cardiacseg-unpack") for p in dst.rglob("*"))  # staging removed
    assert not (tmp_path / "evil.sh").exists()


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_truncated_archive_is_refused_with_nothing_placed(archive, tmp_path, cut):
    data = archive.read_bytes()
    dst = tmp_path / "dst"
    r = cli("unpack", "-", *to_args(dst), input=data[: int(len(data) * cut)])
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err and "nothing was placed" in err, err
    assert "truncated" in err or "damaged" in err, err
    assert files_under(dst) == {} if dst.exists() else True


def test_a_link_in_the_destination_pointing_outside_its_root_is_refused(archive, tmp_path):
    dst, outside = tmp_path / "dst", tmp_path / "outside"
    outside.mkdir()
    (dst / "results").mkdir(parents=True)
    (dst / "results" / DS).symlink_to(outside)
    r = cli("unpack", archive, *to_args(dst))
    assert r.returncode == 2 and "outside" in r.stderr.decode() and "through a link" in r.stderr.decode()
    assert list(outside.iterdir()) == [] and not (dst / "preprocessed" / DS).exists()


def test_differing_file_is_moved_aside_identical_one_kept_and_dry_run_writes_nothing(archive, src, tmp_path):
    dst = tmp_path / "dst"
    plans = dst / "preprocessed" / DS / "nnUNetPlans.json"
    plans.parent.mkdir(parents=True)
    plans.write_text('{"mine": 1}')
    split = dst / "preprocessed" / DS / "splits_final.json"
    split.write_bytes((src / "preprocessed" / DS / "splits_final.json").read_bytes())
    before = files_under(dst)
    r = cli("unpack", archive, *to_args(dst), "--dry-run")
    assert r.returncode == 0 and "verified; nothing written" in r.stdout.decode()
    assert files_under(dst) == before
    r = cli("unpack", archive, *to_args(dst), "--skip-load-check")
    assert r.returncode == 0, r.stderr.decode()
    (aside,) = plans.parent.glob("nnUNetPlans.json.before-unpack-*")
    assert aside.read_text() == '{"mine": 1}'
    assert plans.read_bytes() == (src / "preprocessed" / DS / "nnUNetPlans.json").read_bytes()
    assert not list(plans.parent.glob("splits_final.json.*"))  # identical: kept, not moved aside
    assert "1 different ones moved aside" in r.stdout.decode()


# ---- consistent snapshot while training runs --------------------------------------------------------
def spec_for(src: Path) -> pack.Spec:
    return pack.spec_from_env(DS, "3d_fullres", [0], "nnUNetTrainer", "nnUNetPlans", env=nnunet_env(src))


def test_checkpoint_being_written_is_waited_for(src, tmp_path):
    ck = src / "results" / DS / TR / "fold_0" / "checkpoint_latest.pth"
    complete = ck.read_bytes()
    ck.write_bytes(complete[: len(complete) // 2])  # torch.save half-way through
    said = []

    def say(msg):  # the writer finishes while pack waits: what pack then takes is the complete file
        said.append(msg)
        if "waiting" in msg:
            ck.write_bytes(complete)

    sources, folds = pack.collect(spec_for(src), wait_seconds=60, say=say)
    assert any("incomplete" in m for m in said)
    assert folds[0]["resume"] == "checkpoint_latest.pth" and folds[0]["epoch"] == 7
    assert any(s.path == ck for s in sources)


def test_checkpoint_that_stays_incomplete_is_left_out_and_c_resumes_from_best(src, tmp_path):
    ck = src / "results" / DS / TR / "fold_0" / "checkpoint_latest.pth"
    ck.write_bytes(ck.read_bytes()[:5000])
    out = tmp_path / "job.tar"
    with open(out, "wb") as fh:
        sources, folds = pack.collect(spec_for(src), wait_seconds=0)
        pack.write(fh, spec_for(src), sources, folds, quiet=True)
    assert (folds[0]["resume"], folds[0]["epoch"]) == ("checkpoint_best.pth", 5)
    dst = tmp_path / "dst"
    r = cli("unpack", out, *to_args(dst))
    assert r.returncode == 0, r.stderr.decode()
    assert "fold 0: checkpoint_best.pth, epoch 5, EMA 0.500" in r.stdout.decode()
    assert not (dst / "results" / DS / TR / "fold_0" / "checkpoint_latest.pth").exists()


def test_a_file_that_changes_between_the_passes_fails_the_pack(src, tmp_path, monkeypatch):
    victim = src / "preprocessed" / DS / "nnUNetPlans_3d_fullres" / "case_001.b2nd"
    real = pack_stream.hash_pass

    def hash_then_change(sources, progress):
        real(sources, progress)
        victim.write_bytes(os.urandom(victim.stat().st_size))

    monkeypatch.setattr(pack_stream, "hash_pass", hash_then_change)
    sources, folds = pack.collect(spec_for(src))
    with pytest.raises(pack.PackError, match="case_001.b2nd changed while packing"):
        pack.write(io.BytesIO(), spec_for(src), sources, folds, quiet=True)


# ---- what --c will make of it here ------------------------------------------------------------------
HERE = {"versions": {"python": "3.11.2", "torch": "2.6.0", "numpy": "1.26.4", "nnunetv2": "2.5.1"},
        "weights_only": None, "trainer": None, "trainer_error": "Could not find requested nnunet trainer X",
        "checkpoints": [{"fold": 0, "path": "/r/fold_0/checkpoint_latest.pth",
                         "error": "ModuleNotFoundError: No module named 'numpy._core'"}]}


def test_findings_name_each_incompatibility_with_its_fix():
    source = {"python": "3.11.2", "torch": "2.5.0", "numpy": "2.1.0", "nnunetv2": "2.5.1", "device": "mps"}
    found = unpack.findings(HERE, "", source, "nnUNetTrainerX", "cuda")
    text = "\n".join(f"{lv}: {t}" for lv, t in found)
    assert "fatal: fold 0: checkpoint_latest.pth does not load here" in text and "numpy>=2" in text
    assert "fatal: trainer class 'nnUNetTrainerX' is not importable here" in text
    assert "nnunetv2>=2.6" in text  # nnunetv2 2.5 under torch 2.6: weights_only=True by default
    assert "ok: device mps on the source, cuda here: normal" in text


def test_check_findings_loads_the_configured_folds_checkpoint(src, tmp_path):
    from conftest import write_config
    from supervisor.config import loader as config
    cfg = config.load(write_config(tmp_path / "config.toml", {
        "training": {"dataset": DS, "configuration": "3d_fullres", "fold": 0, "device": "cpu"},
        "paths": {"preprocessed": str(src / "preprocessed"), "results": str(src / "results")}}))
    found = pack.check_findings(cfg)
    assert ("ok", "fold 0: checkpoint_latest.pth, epoch 7, EMA 0.683") in found, found
    assert not [f for f in found if f[0] == "fatal"], found
