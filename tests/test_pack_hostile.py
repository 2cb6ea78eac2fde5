"""pack/unpack on hostile or large input, with real files and real processes: constant memory, bounded work,
nothing placed wrongly. Peak memory is the command's own high-water mark (VmHWM of its process, read by
the process itself as it exits: a child's rusage would include this large pytest process's pages)."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, write_config
from test_pack import DS, TR, cli, files_under, make_archive, make_src, nnunet_env, to_args
from supervisor.commands import pack, pack_stream
from supervisor.commands import pack_manifest as mf

MB = 1 << 20
# the command, and its peak RSS on stderr as it ends (however it ends)
PEAK = ("import runpy, sys\n"
        "sys.argv[0] = 'cardiacseg-train'\n"
        "try:\n"
        "    runpy.run_module('supervisor', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    kb = next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:'))\n"
        "    sys.stderr.write(f'\\npeak-rss-kb {kb}\\n')\n")
@pytest.fixture
def src(tmp_path):
    return make_src(tmp_path)


@pytest.fixture
def archive(src, tmp_path) -> Path:
    return make_archive(src, tmp_path)


needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")


def peak(*args, env=None) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cardiacseg-train ARGS`; (result, its peak RSS in MiB)."""
    r = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], cwd=REPO, capture_output=True,
                       env={**os.environ, **(env or {})})
    kb = re.findall(rb"peak-rss-kb (\d+)", r.stderr)
    assert kb, r.stderr.decode()
    return r, int(kb[-1]) / 1024


def gz_tar(path: Path, members, opener=lambda f, mode: gzip.GzipFile(fileobj=f, mode=mode)) -> Path:
    """A compressed tar of (name, size, binary reader) streamed to path: nothing is held whole."""
    with open(path, "wb") as raw, opener(raw, mode="wb") as z, \
            tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, size, reader in members:
            ti = tarfile.TarInfo(name)
            ti.size = size
            tar.addfile(ti, reader)
    return path


class Zeros(io.RawIOBase):
    def readinto(self, b):
        b[:] = bytes(len(b))
        return len(b)

    def readable(self):
        return True


def zeros_archive(path: Path, size: int, opener=None) -> tuple[Path, str]:
    """A valid archive (its sha256 and MANIFEST.json.sha256 match) of one member of `size` zero bytes."""
    h = hashlib.sha256()
    for _ in range(size // MB):
        h.update(bytes(MB))
    rel = f"{DS}/zeros.bin"
    man = mf.build([{"root": "results", "path": rel, "size": size, "sha256": h.hexdigest()}], [],
                   {"dataset": DS, "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "plans": "nnUNetPlans",
                    "folds": []}, None)
    line = mf.digest_line(man)
    gz_tar(path, [(mf.MANIFEST, len(man), io.BytesIO(man)), (f"results/{rel}", size, io.BufferedReader(Zeros())),
                  (mf.MANIFEST_SUM, len(line), io.BytesIO(line))], *([opener] if opener else []))
    return path, rel


def refused(r, *words):
    err = r.stderr.decode()
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "nothing was placed" in err, err
    for w in words:
        assert w in err, err
    return err


# ---- pack ---------------------------------------------------------------------------------------------
@needs_proc
def test_pack_memory_stays_flat_for_a_fold_folder_of_many_files(src, tmp_path):
    fold = src / "results" / DS / TR / "fold_0"
    (fold / "validation").mkdir()
    block = os.urandom(MB)
    for i in range(40):  # 160 MiB in files of 4 MiB: each small enough to have been held whole before
        (fold / ("validation" if i % 2 else ".") / f"case_{i:03d}.npz").write_bytes(block * 4)
    r, mib = peak("pack", DS, "3d_fullres", "0", "-o", tmp_path / "job.tar", env=nnunet_env(src))
    assert r.returncode == 0, r.stderr.decode()
    assert mib < 90, f"pack peaked at {mib:.0f} MiB for 160 MiB of fold files"
    with tarfile.open(tmp_path / "job.tar") as tar:
        assert sum(m.name.endswith(".npz") for m in tar.getmembers()) == 40


def test_a_link_out_of_the_roots_is_left_out_and_said_one_inside_is_followed(src, tmp_path):
    outside = tmp_path / "home"
    (outside / ".ssh").mkdir(parents=True)
    (outside / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    fold = src / "results" / DS / TR / "fold_0"
    (fold / "id_rsa").symlink_to(outside / ".ssh" / "id_rsa")
    (fold / "home").symlink_to(outside)
    (fold / "plans_copy.json").symlink_to(src / "results" / DS / TR / "plans.json")  # inside the roots
    out = tmp_path / "job.tar"
    r = cli("pack", DS, "3d_fullres", "0", "-o", out, env=nnunet_env(src))
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert f"left out {fold / 'id_rsa'}: a link to {outside / '.ssh' / 'id_rsa'}" in err
    assert f"left out {fold / 'home'}: a link to {outside}" in err
    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert not [n for n in names if "id_rsa" in n or "/home" in n], names
        assert tar.extractfile(f"results/{DS}/{TR}/fold_0/plans_copy.json").read() == b"{}"
        assert all(m.isreg() for m in tar.getmembers())


def test_pack_into_a_pipe_closed_early_exits_141_quietly(src):
    # more than any pipe buffer holds, so pack is still writing when the reader goes away
    (src / "preprocessed" / DS / "nnUNetPlans_3d_fullres" / "big.b2nd").write_bytes(os.urandom(8 * MB))
    reader = subprocess.Popen(["sh", "-c", "head -c1 >/dev/null"], stdin=subprocess.PIPE)
    r = subprocess.run([sys.executable, "-m", "supervisor", "pack", DS, "3d_fullres", "0", "-o", "-"], cwd=REPO,
                       env={**os.environ, **nnunet_env(src)}, stdout=reader.stdin, stderr=subprocess.PIPE,
                       timeout=120)
    reader.stdin.close()
    assert reader.wait(timeout=60) == 0
    err = r.stderr.decode()
    assert r.returncode == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err and "Exception ignored" not in err, err


def test_a_file_appended_to_between_the_passes_is_packed_as_hashed(src, tmp_path, monkeypatch):
    log = src / "results" / DS / TR / "fold_0" / "training_log_2026_1_2_03_04_05.txt"
    before = log.read_bytes()
    real = pack_stream.hash_pass

    def hash_then_append(sources, progress):
        real(sources, progress)
        with open(log, "ab") as fh:
            fh.write(b"Epoch 7\n")  # nnU-Net keeps logging while pack writes

    monkeypatch.setattr(pack, "CAPTURE_BUDGET", 0)  # read from the file again in pass 2, not captured
    monkeypatch.setattr(pack_stream, "hash_pass", hash_then_append)
    spec = pack.spec_from_env(DS, "3d_fullres", [0], "nnUNetTrainer", "nnUNetPlans", env=nnunet_env(src))
    sources, folds = pack.collect(spec)
    assert not [s for s in sources if s.data is not None]
    with open(tmp_path / "job.tar", "wb") as fh:
        pack.write(fh, spec, sources, folds, quiet=True)
    with tarfile.open(tmp_path / "job.tar") as tar:
        assert tar.extractfile(f"results/{DS}/{TR}/fold_0/{log.name}").read() == before
    assert cli("unpack", tmp_path / "job.tar", *to_args(tmp_path / "dst"), "--dry-run").returncode == 0


def test_pack_refuses_a_file_list_larger_than_unpack_reads(src, monkeypatch):
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 2000)
    spec = pack.spec_from_env(DS, "3d_fullres", [0], "nnUNetTrainer", "nnUNetPlans", env=nnunet_env(src))
    sources, folds = pack.collect(spec)
    with pytest.raises(pack.PackError, match="more than the 2000 unpack reads as a MANIFEST.json"):
        pack.write(io.BytesIO(), spec, sources, folds, quiet=True)


# ---- unpack: bounded input ----------------------------------------------------------------------------
def test_a_manifest_header_larger_than_a_manifest_is_refused_before_reading_it(tmp_path):
    size = mf.MAX_MANIFEST_BYTES + 1
    bad = gz_tar(tmp_path / "bad.tar.gz", [(mf.MANIFEST, size, io.BufferedReader(Zeros()))])
    r = cli("unpack", bad, *to_args(tmp_path / "dst"), "--dry-run")
    refused(r, f"{mf.MANIFEST}: {size} bytes, more than the {mf.MAX_MANIFEST_BYTES}", "refused before reading it")


@needs_proc
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_manifest_bomb_of_empty_objects_costs_bounded_memory(tmp_path, dry_run):
    head = b'{"format": "%s", "job": {}, "source": {}, "folds": [], "files": [' % mf.FORMAT.encode()
    data = head + b"{}," * (16_000_000 // 3) + b"{}]}"  # 16 MB, ~16 KB gzipped: 5 million dicts once parsed
    bad = gz_tar(tmp_path / "bad.tar.gz", [(mf.MANIFEST, len(data), io.BytesIO(data))])
    r, mib = peak("unpack", bad, *to_args(tmp_path / "dst"), *(["--dry-run"] if dry_run else []))
    assert mib < 90, f"unpack peaked at {mib:.0f} MiB on a {len(data) >> 20} MiB manifest"
    refused(r, f"{mf.MANIFEST}: ", "JSON values in", "refused before parsing it")
    assert files_under(tmp_path) == {"bad.tar.gz": (tmp_path / "bad.tar.gz").read_bytes()}


@needs_proc
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_gzipped_member_of_zeros_streams_in_bounded_memory(tmp_path, dry_run):
    arc, rel = zeros_archive(tmp_path / "zeros.tar.gz", 160 * MB)  # 160 MiB in ~160 KB
    dst = tmp_path / "dst"
    r, mib = peak("unpack", arc, *to_args(dst), "--skip-load-check", *(["--dry-run"] if dry_run else []))
    assert r.returncode == 0, r.stderr.decode()
    assert mib < 90, f"unpack peaked at {mib:.0f} MiB for a 160 MiB member"
    placed = dst / "results" / rel
    assert (not placed.exists()) if dry_run else placed.stat().st_size == 160 * MB


def test_a_bzip2_bomb_is_refused_with_the_member_named(tmp_path):
    arc, rel = zeros_archive(tmp_path / "zeros.tar.bz2", 48 * MB, bz2.BZ2File)  # 48 MiB in ~100 bytes
    assert arc.stat().st_size < 2000
    r = cli("unpack", arc, *to_args(tmp_path / "dst"), "--dry-run")
    refused(r, f"results/{rel}: the bzip2 stream expands to more than", "a compression bomb")


def test_a_truncated_gzip_stream_is_refused_naming_the_member_being_read(archive, tmp_path):
    data = gzip.compress(archive.read_bytes())
    r = cli("unpack", "-", *to_args(tmp_path / "dst"), input=data[: int(len(data) * 0.9)])
    err = refused(r)
    assert re.search(r"refused: (preprocessed|results)/\S+: the gzip stream is damaged or truncated", err), err


@pytest.mark.parametrize("case", ["pax_header_bomb", "pax_global_header", "gnu_sparse"])
def test_headers_tarfile_would_hold_whole_are_refused(archive, tmp_path, case):
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = tmp_path / "bad.tar"
    fmt = tarfile.GNU_FORMAT if case == "gnu_sparse" else tarfile.PAX_FORMAT
    glob = {"comment": "x"} if case == "pax_global_header" else None
    with tarfile.open(out, "w", format=fmt, pax_headers=glob) as tar:
        for i, (m, d) in enumerate(members):
            if i == 1 and case == "pax_header_bomb":
                m.pax_headers = {"comment": "x" * (2 * MB)}
            if i == 1 and case == "gnu_sparse":
                m.type = tarfile.GNUTYPE_SPARSE
            tar.addfile(m, io.BytesIO(d))
    r = cli("unpack", out, *to_args(tmp_path / "dst"), "--dry-run")
    want = {"pax_header_bomb": "an extended header of", "pax_global_header": "a pax global header",
            "gnu_sparse": "a GNU sparse file"}[case]
    refused(r, want)


def test_a_manifest_that_would_write_beside_the_fold_folders_is_refused(archive, tmp_path):
    """folds[].path names where unpack saves the manifest for `check`: it must stay inside results."""
    from test_pack import rebuild, resign

    def edit(members):
        man = json.loads(members[0][1])
        man["folds"][0]["path"] = "../../../elsewhere/fold_0"
        members[0] = (members[0][0], json.dumps(man).encode())
        return resign(members)

    bad = rebuild(archive, tmp_path / "bad.tar", edit)
    r = cli("unpack", bad, *to_args(tmp_path / "dst"))
    refused(r, "folds[0].path '../../../elsewhere/fold_0' is a path with '..'")
    assert not (tmp_path / "elsewhere").exists()


# ---- unpack: nothing placed wrongly ---------------------------------------------------------------------
def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_mount = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` (a mount namespace) for a "
                                                               "real second filesystem")


@needs_mount
@pytest.mark.parametrize("room", ["4k", "1m"])
def test_a_fold_folder_on_another_filesystem(archive, src, tmp_path, room):
    """fold_0 is a tmpfs mounted below the results root: its files cannot be renamed from staging. With no
    room there, nothing is placed anywhere and nothing moved aside; with room, they are copied there."""
    dst = tmp_path / "dst"
    fold = dst / "results" / DS / TR / "fold_0"
    fold.mkdir(parents=True)
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" && printf "what the user had" > "$2/checkpoint_latest.pth" '
              '&& "$3" -m supervisor unpack "$4" --to-preprocessed "$5" --to-results "$6" --skip-load-check; '
              'echo "rc=$?"; cd "$2" && for f in * .[!.]*; do [ -e "$f" ] && echo "in mount: $f $(cksum < "$f")"; done; '
              'true')
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", room, fold, sys.executable, archive,
                        dst / "preprocessed", dst / "results"], cwd=REPO, capture_output=True, timeout=300)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert "Traceback" not in err, err
    inside = sorted(ln.split()[2] for ln in out.splitlines() if ln.startswith("in mount:"))
    want = (src / "results" / DS / TR / "fold_0" / "checkpoint_latest.pth").read_bytes()
    if room == "4k":
        assert "rc=2" in out, out + err
        assert f"cannot write {fold}/" in err and "No space left on device; nothing was placed" in err, err
        assert inside == ["checkpoint_latest.pth"], out  # the user's, unchanged (below), nothing moved aside
        user = subprocess.run(["cksum"], input=b"what the user had", capture_output=True).stdout.decode().strip()
        assert f"in mount: checkpoint_latest.pth {user}" in out, out
        assert files_under(dst) == {}  # outside the mount: nothing placed, no staging, no copies
        assert not [p for p in dst.rglob("*") if p.name.startswith(".")], list(dst.rglob("*"))
    else:
        assert "rc=0" in out, out + err
        assert "checkpoint_latest.pth" in inside and "progress.png" in inside, out
        assert [n for n in inside if n.startswith("checkpoint_latest.pth.before-unpack-")], out  # moved aside
        ck = subprocess.run(["cksum"], input=want, capture_output=True).stdout.decode().strip()
        assert f"in mount: checkpoint_latest.pth {ck}" in out, out
        assert not [n for n in inside if n.endswith(".tmp")], out
        assert (dst / "preprocessed" / DS / "splits_final.json").is_file()


def _fake_trainer(tmp_path: Path, results: Path, *job: str) -> subprocess.Popen:
    """A process that looks like `nnUNetv2_train DATASET CONFIGURATION FOLD` on `results`; it is up once it
    has said so, and ends when its stdin closes."""
    prog = tmp_path / "bin" / "nnUNetv2_train"
    prog.parent.mkdir(exist_ok=True)
    prog.write_text(f"#!{sys.executable}\nimport sys\nprint('training', flush=True)\nsys.stdin.read()\n")
    prog.chmod(0o755)
    p = subprocess.Popen([str(prog), *job], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={**os.environ, "nnUNet_results": str(results)})
    assert p.stdout.readline() == b"training\n"
    return p


def _lock_holder(state: Path) -> subprocess.Popen:
    """A real process holding the supervisor's lock on `state` (store.Lock, as `run` takes it)."""
    code = ("import sys; from supervisor.integrations.store import Lock; l = Lock(sys.argv[1]); l.acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    state.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", code, str(state)], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"locked\n"
    return p


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("what", ["trainer", "supervisor"])
def test_unpack_into_a_job_training_now_is_refused_naming_what_runs(archive, tmp_path, what, dry_run):
    dst = tmp_path / "dst"
    cfg = write_config(tmp_path / "config.toml", {
        "training": {"dataset": DS, "configuration": "3d_fullres", "fold": 0, "device": "cpu"},
        "paths": {"preprocessed": str(dst / "preprocessed"), "results": str(dst / "results"),
                  "state_dir": str(tmp_path / "state")}})
    running = (_fake_trainer(tmp_path, dst / "results", DS, "3d_fullres", "0", "--c") if what == "trainer"
               else _lock_holder(tmp_path / "state"))
    try:
        args = ["--config", cfg] if what == "supervisor" else to_args(dst)
        r = cli("unpack", archive, *args, *(["--dry-run"] if dry_run else []))
    finally:
        running.stdin.close()
        running.wait(timeout=60)
    want = (f"another trainer is training {DS}/{TR}/fold_0 right now (pid {running.pid}: " if what == "trainer"
            else f"a cardiacseg-train supervisor (pid {running.pid}) is running this job")
    refused(r, want, "stop it first")
    assert files_under(dst) == {} if dst.exists() else True
    # the same archive, once nothing trains there any more
    r = cli("unpack", archive, *(["--config", cfg] if what == "supervisor" else to_args(dst)), "--skip-load-check")
    assert r.returncode == 0, r.stderr.decode()


def test_a_trainer_on_another_fold_does_not_block_unpacking_this_one(archive, tmp_path):
    dst = tmp_path / "dst"
    other = _fake_trainer(tmp_path, dst / "results", DS, "3d_fullres", "1")
    try:
        r = cli("unpack", archive, *to_args(dst), "--skip-load-check")
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def test_files_larger_than_the_free_space_are_refused_before_a_byte_is_written(tmp_path):
    """A manifest may declare any size; staging would fill the disk before the sha256 could disagree."""
    size = 1 << 50  # 1 PiB, declared by the manifest and the member's header; the body never comes
    man = mf.build([{"root": "results", "path": f"{DS}/huge.bin", "size": size, "sha256": "0" * 64}], [],
                   {"dataset": DS, "configuration": "3d_fullres", "trainer": "nnUNetTrainer", "plans": "nnUNetPlans",
                    "folds": []}, None)
    bad = gz_tar(tmp_path / "bad.tar.gz", [(mf.MANIFEST, len(man), io.BytesIO(man))])
    dst = tmp_path / "dst"
    r = cli("unpack", bad, *to_args(dst))
    refused(r, f"its files take {size / 1e9:.2f} GB, the filesystem of ", "GB free")
    assert not dst.exists() or not list(dst.rglob("*"))
