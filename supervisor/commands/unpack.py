"""`cardiacseg-train unpack`: verify every byte of a pack archive, then move its files into place.

How it works
- The archive is read once, as a stream (a pipe from ssh works), through archive_stream.py: gzip, bzip2
  and xz are recognised and decompressed in bounded reads, a compression bomb is refused, and so are
  headers tarfile would hold whole. Its first member must be MANIFEST.json, at most MAX_MANIFEST_BYTES
  (checked from its header, before a byte of it is read; manifest.parse bounds what parsing costs).
  Every later member must be a regular file, listed in the manifest, not seen before, of the listed
  size. It is written into a staging folder `<root>/.cardiacseg-unpack-<random>/` (the filesystem of its
  root) while its sha256 is computed, and compared with the manifest when the member ends. The last
  member, MANIFEST.json.sha256, must match the manifest's own bytes. Links, devices, folders, absolute
  names, `..`, unlisted or duplicate members, a short or damaged member, a truncated stream, a file
  listed but absent: each is BadArchive naming the member; the staging folders are removed and nothing
  is placed. Memory stays constant: members are copied in CHUNK blocks, headers are forgotten once read.
- Before anything is written (unpack_checks.py): every destination inside its root, room for staging,
  the job's supervisor lock free (held until the end) and no trainer on a fold folder the archive
  writes into; the trainers are looked for again before placing.
- Placing, only after the whole archive verified: preprocessed and raw data first and results last, so
  a checkpoint is never in place without its data. An existing file with the same content is kept; a
  different one (or a link, a folder) is moved aside as `<name>.before-unpack-<UTC time>`, never
  overwritten. A destination on another filesystem than its staging folder (a mount point below the
  root) is first copied beside itself under a temporary name, for every such file, before anything is
  moved aside: a copy that fails (a full disk) removes the copies and the folders made for them, and
  nothing is placed or moved aside. Then placing is renames only.
- `--dry-run` streams and verifies the same way (the same checks, the lock only probed) without writing.
- Afterwards (and in `check`, pack.check_findings) resume_probe.py loads each fold's resume checkpoint
  with the installed torch/numpy in a subprocess with a timeout; `findings` turns its answer and the
  manifest's source versions into (level, text) pairs with the fix for each known incompatibility.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import tarfile
import zlib
from pathlib import Path

from supervisor.commands import archive_stream
from supervisor.commands import pack_manifest as mf
from supervisor.commands import unpack_checks as checks
from supervisor.config.loader import ConfigError
from supervisor.core import known_bad
from supervisor.integrations import probes
from supervisor.config.job import CHECKPOINT_ORDER
from supervisor.integrations.store import fsync_dir, move_aside, temp_beside

CHUNK = 1 << 20
PLACE_ORDER = {"preprocessed": 0, "raw": 1, "results": 2}


class WriteError(Exception):
    """A file could not be written (a full disk, a permission): the message names it and what was left."""


def _stage_member(tar, ti, entry: dict, staging: Path | None) -> None:
    """Copy one member to staging (or nowhere for a dry run), checking its size and sha256."""
    h, n = hashlib.sha256(), 0
    src = tar.extractfile(ti)
    out = None
    if staging is not None:
        dest = staging / entry["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = open(dest, "xb")
    try:
        while block := src.read(CHUNK):
            h.update(block)
            n += len(block)
            if out is not None:
                out.write(block)
    finally:
        if out is not None:
            out.close()
    name = mf.member_name(entry["root"], entry["path"])
    if n != entry["size"]:
        raise mf.BadArchive(f"{name}: {n} bytes, MANIFEST.json says {entry['size']} (truncated archive)")
    if h.hexdigest() != entry["sha256"]:
        raise mf.BadArchive(f"{name}: sha256 differs from MANIFEST.json (damaged in transit or edited)")
    if out is not None:
        os.utime(staging / entry["path"], (ti.mtime, ti.mtime))


def _kind(ti: tarfile.TarInfo) -> str:
    return ("a symbolic link" if ti.issym() else "a hard link" if ti.islnk() else "a folder" if ti.isdir()
            else "a device" if ti.isdev() else "a FIFO" if ti.isfifo() else "not a regular file")


def _manifest(tar, stream) -> tuple[dict, bytes]:
    first = tar.next()
    if first is None or first.name != mf.MANIFEST or not first.isreg():
        got = "an empty archive" if first is None else f"{first.name!r}"
        raise mf.BadArchive(f"the first member must be {mf.MANIFEST} (written by cardiacseg-train pack); got {got}")
    if first.size > mf.MAX_MANIFEST_BYTES:
        raise mf.BadArchive(f"{mf.MANIFEST}: {first.size} bytes, more than the {mf.MAX_MANIFEST_BYTES} a "
                            "manifest may take; refused before reading it")
    stream.where = mf.MANIFEST
    src, man, values = tar.extractfile(first), bytearray(), 0
    while block := src.read(CHUNK):  # a bomb of tiny values is refused at its first block, not once whole
        man += block
        values += mf.values_in(block)
        mf.check_density(len(man), values)
    return mf.parse(man), bytes(man)


def _verify_members(tar, stream, doc: dict, man_bytes: bytes, staging: dict | None, quiet: bool) -> None:
    expected = {mf.member_name(f["root"], f["path"]): f for f in doc["files"]}
    seen, summed = set(), False
    with mf.Progress("unpack: verifying", sum(f["size"] for f in doc["files"]), quiet=quiet) as p:
        while (ti := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it read; a stream needs none of them
            stream.where = ti.name
            if summed:
                raise mf.BadArchive(f"{ti.name}: after {mf.MANIFEST_SUM}, which ends the archive")
            if ti.name == mf.MANIFEST_SUM and ti.isreg():
                if tar.extractfile(ti).read(1024) != mf.digest_line(man_bytes):
                    raise mf.BadArchive(f"{mf.MANIFEST}: its sha256 differs from {mf.MANIFEST_SUM} "
                                        "(the manifest was edited or damaged)")
                summed = True
                continue
            root, _, rel = ti.name.partition("/")
            why = mf.safe_relpath(rel) if root in mf.ROOTS else "not under raw/, preprocessed/ or results/"
            if why is not None:
                raise mf.BadArchive(f"{ti.name}: escapes its root ({why}); refused")
            if not ti.isreg():
                raise mf.BadArchive(f"{ti.name}: {_kind(ti)}; pack writes regular files only, refused")
            entry = expected.get(ti.name)
            if entry is None or ti.name in seen:
                raise mf.BadArchive(f"{ti.name}: {'a second copy' if entry else 'not listed in MANIFEST.json'}; refused")
            if ti.size != entry["size"]:
                raise mf.BadArchive(f"{ti.name}: {ti.size} bytes, MANIFEST.json says {entry['size']}")
            _stage_member(tar, ti, entry, None if staging is None else staging[root])
            seen.add(ti.name)
            p.add(ti.size)
        stream.where = "the archive's end"
    if missing := [n for n in expected if n not in seen]:
        raise mf.BadArchive(f"{missing[0]}: listed in MANIFEST.json but not in the archive"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not summed:
        raise mf.BadArchive(f"the archive ends before {mf.MANIFEST_SUM} (truncated)")


def _makedirs(folder: Path, made: list) -> None:
    """mkdir -p, each folder it creates recorded in `made` (to be removed again if placing fails)."""
    if folder.is_dir():
        return
    _makedirs(folder.parent, made)
    folder.mkdir()
    made.append(folder)


def _copy_beside(staged: Path, dest: Path) -> Path:
    """staged copied to a temporary name beside dest (dest's filesystem), flushed to disk."""
    fd, tmp = temp_beside(dest.parent, dest.name)
    try:
        with os.fdopen(fd, "wb") as out, open(staged, "rb") as src:
            shutil.copyfileobj(src, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(staged, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(dest)) from None
    return tmp


def _place(doc: dict, roots: dict, staging: dict, counts: dict) -> None:
    moves, made, copies = [], [], []
    for f in sorted(doc["files"], key=lambda f: PLACE_ORDER[f["root"]]):  # stable: manifest order within
        staged, dest = staging[f["root"]] / f["path"], Path(roots[f["root"]]) / f["path"]
        if os.path.lexists(dest) and not dest.is_symlink() and dest.is_file() \
                and dest.stat().st_size == f["size"] and _sha(dest) == f["sha256"]:
            counts["same"] += 1
            continue
        moves.append([staged, dest])
    try:  # everything that can fail for want of room happens before anything is moved aside or placed
        for move in moves:
            _makedirs(move[1].parent, made)
            if os.stat(move[1].parent).st_dev != os.stat(move[0]).st_dev:
                move[0] = _copy_beside(move[0], move[1])
                copies.append(move[0])
    except BaseException:
        for path in copies:
            path.unlink(missing_ok=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty after all: someone else's file is in it now; it stays
        raise
    for i, (src, dest) in enumerate(moves):
        try:
            if os.path.lexists(dest):
                counts["moved_aside"].append(str(move_aside(dest, "before-unpack")))
            os.replace(src, dest)
        except BaseException:
            for left, _ in moves[i:]:
                if left in copies:
                    left.unlink(missing_ok=True)
            raise
        counts["placed"] += 1
    for folder in {dest.parent for _, dest in moves}:
        fsync_dir(folder)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def unpack(src, roots: dict, dry_run: bool = False, quiet: bool = False, cfg=None) -> dict:
    """Verify the archive read from the binary stream `src`, then place it; BadArchive or Refused if
    anything fails (then nothing is placed and no staging folder is left). `cfg`: the job whose
    supervisor lock is held meanwhile (--config)."""
    roots = {k: (Path(v).absolute() if v is not None else None) for k, v in roots.items()}
    staging: dict = {}
    counts = {"placed": 0, "same": 0, "moved_aside": []}
    lock = stream = None
    try:
        tar, stream = archive_stream.tar_stream(src)
        with tar:
            doc, man_bytes = _manifest(tar, stream)
            checks.check_destinations(doc, roots)
            lock = checks.hold_lock(cfg, dry_run)
            checks.trainers_here(doc, roots)
            if not dry_run:
                checks.check_space(doc, roots)
                for r in {f["root"] for f in doc["files"]}:
                    Path(roots[r]).mkdir(parents=True, exist_ok=True)
                    staging[r] = Path(roots[r]) / f".cardiacseg-unpack-{secrets.token_hex(4)}"
                    staging[r].mkdir()
            _verify_members(tar, stream, doc, man_bytes, None if dry_run else staging, quiet)
        if not dry_run:
            checks.trainers_here(doc, roots)  # one may have started while the archive streamed
            _place(doc, roots, staging, counts)
        return {"manifest": doc, **counts}
    except (tarfile.TarError, EOFError, zlib.error) as e:
        where = f"{stream.where}: " if stream is not None else ""
        raise mf.BadArchive(f"{where}the archive is damaged or truncated ({type(e).__name__}: {e})") from None
    except OSError as e:
        what = f"cannot write {e.filename}: {e.strerror}" if e.filename else f"cannot read or write: {e}"
        done = (f"{counts['placed']} files were placed before it, the others removed" if counts["placed"]
                else "nothing was placed")
        raise WriteError(f"{what}; {done}") from None
    finally:
        for d in staging.values():
            shutil.rmtree(d, ignore_errors=True)
        if lock is not None:
            lock.release()


# ---- can --c load it here? --------------------------------------------------------------------------
def run_probe(trainer: str | None, checkpoints: list, env: dict | None = None) -> tuple[dict | None, str]:
    """supervisor/trainer/resume_probe.py's answer: each checkpoint loaded as `--c` will, in the trainer's env."""
    return probes.ask("resume_probe", json.dumps({"trainer": trainer, "checkpoints": checkpoints}), env)


def _fix(error: str, here: dict) -> str:
    """The fix for a load error, in the words of the known-bad rule it is (core/known_bad.py)."""
    if known_bad.NUMPY2_MODULE in error:
        return f"it was pickled under numpy 2, numpy here is {here.get('numpy')}: {known_bad.FIX_NUMPY2}"
    if "weights_only" in error or "Weights only load failed" in error:
        return (f"nnunetv2 {here.get('nnunetv2')} loads checkpoints with torch {here.get('torch')}'s default "
                f"weights_only=True: {known_bad.FIX_WEIGHTS_ONLY}")
    return "--c would fail to start with this error"


def _here(here: dict, numpy2: bool | None = None, checkpoint: str | None = None) -> known_bad.Versions:
    return known_bad.Versions(nnunetv2=here.get("nnunetv2"), torch=here.get("torch"), numpy=here.get("numpy"),
                              checkpoint=checkpoint, checkpoint_numpy2=numpy2)


def findings(info: dict | None, why: str, source: dict | None, trainer: str | None, device: str | None,
             version_rules: bool = True) -> list[tuple[str, str]]:
    """(level, text) pairs: level "ok" | "warning" | "fatal", as check.Finding. `version_rules`: also judge
    the versions here (and the source's numpy) by the known-bad table; `check` does that itself, once."""
    if info is None:
        return [("warning", f"could not load the resume checkpoints to test them ({why})")]
    if info.get("import_error"):
        return [("fatal", f"torch/nnunetv2 do not import here: {info['import_error']}")]
    out, here = [], info["versions"]
    for c in info.get("checkpoints", []):
        name = Path(c["path"]).name
        if c["error"]:
            out.append(("fatal", f"fold {c['fold']}: {name} does not load here ({c['error']}): {_fix(c['error'], here)}"))
        else:
            out.append(("ok", mf.describe_resume(c["fold"], name, c)))
    if trainer and info.get("trainer") is None and "trainer_error" in info:
        out.append(("fatal", f"trainer class {trainer!r} is not importable here ({info['trainer_error']}): install "
                             "the package that defines it, or point nnUNet_extTrainer at its folder"))
    src = source or {}
    if version_rules:
        numpy2 = known_bad.release(src.get("numpy")) is not None and known_bad.release(src.get("numpy"))[0] >= 2
        v = _here(here, numpy2, f"each checkpoint packed under numpy {src.get('numpy')}")
        for f in known_bad.judge(v, "cpu"):  # the device's own rules (the driver) are check's
            if f.rule == "weights_only" and info.get("weights_only") is False:
                continue  # the installed load_checkpoint passes weights_only=False whatever its version says
            out.append((f.level, f.text))
    for k in ("nnunetv2", "torch", "numpy", "python"):
        if src.get(k) and here.get(k) and src[k] != here.get(k):
            out.append(("ok", f"{k} {src[k]} on the source, {here[k]} here"))
    if src.get("device") and device and src["device"].split(":")[0] != device.split(":")[0]:
        out.append(("ok", f"device {src['device']} on the source, {device} here: normal, --c continues on it"))
    return out


def fold_checkpoints(results: Path, doc: dict) -> list:
    out = []
    for f in doc["folds"]:
        fdir = Path(results) / f["path"]
        ck = next((fdir / n for n in CHECKPOINT_ORDER if (fdir / n).is_file()), None)
        if ck is not None:
            out.append([f["fold"], str(ck)])
    return out


SAVED_MANIFEST = "cardiacseg-unpacked-manifest.json"  # beside the fold folders: what `check` compares with


def _roots(args, cfg) -> dict:
    env = os.environ
    roots = {"raw": env.get("nnUNet_raw"), "preprocessed": env.get("nnUNet_preprocessed"),
             "results": env.get("nnUNet_results")}
    if cfg is not None:
        roots.update(raw=cfg.paths.raw, preprocessed=cfg.paths.preprocessed, results=cfg.paths.results)
    for k in roots:
        if getattr(args, f"to_{k}", None):  # --to-raw / --to-preprocessed / --to-results win
            roots[k] = getattr(args, f"to_{k}")
    return {k: (Path(v) if v else None) for k, v in roots.items()}


def _save_manifest(doc: dict, results: Path) -> None:
    from supervisor.integrations.store import atomic_write

    for parent in {str(Path(f["path"]).parent) for f in doc["folds"]}:
        dest = results / parent / SAVED_MANIFEST
        if dest.parent.is_dir():
            atomic_write(dest, (json.dumps(doc, indent=1) + "\n").encode())


def cli(args, cfg) -> int:
    """`cardiacseg-train unpack`: 0 placed and loadable, 2 refused (nothing placed) or not loadable here."""
    name = "stdin" if args.file == "-" else args.file
    roots = _roots(args, cfg)
    try:
        src = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
    except OSError as e:
        print(f"cardiacseg-train unpack: {name}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        with src:
            result = unpack(src, roots, dry_run=args.dry_run, quiet=args.quiet, cfg=cfg)
    except (mf.BadArchive, checks.Refused, ConfigError) as e:
        print(f"cardiacseg-train unpack: {name}: refused: {e}; nothing was placed", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"cardiacseg-train unpack: {name}: {e}", file=sys.stderr)
        return 2
    doc = result["manifest"]
    n, size = len(doc["files"]), sum(f["size"] for f in doc["files"]) / 1e9
    if args.dry_run:
        print(f"unpack: {name}: all {n} files ({size:.2f} GB) verified; nothing written (--dry-run)")
        return 0
    print(f"unpack: {n} files ({size:.2f} GB) verified; {result['placed']} placed, {result['same']} already "
          f"there and identical, {len(result['moved_aside'])} different ones moved aside")
    for p in result["moved_aside"]:
        print(f"unpack: moved aside {p}")
    _save_manifest(doc, roots["results"])
    if args.skip_load_check:
        return 0
    from supervisor.config import job
    env = job.build_env(cfg) if cfg is not None else {**os.environ, **{
        v: str(roots[k]) for k, v in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"),
                                      ("results", "nnUNet_results")) if roots[k] is not None}}
    info, why = run_probe(doc["job"].get("trainer"), fold_checkpoints(roots["results"], doc), env)
    found = findings(info, why, doc["source"], doc["job"].get("trainer"), cfg.training.device if cfg else None)
    for level, text in found:
        print(f"unpack: {level}: {text}")
    if any(level == "fatal" for level, _ in found):
        print("unpack: the files are in place, but `--c` will fail here until the above is fixed", file=sys.stderr)
        return 2
    return 0
