"""`cardiacseg-train pack`: one verified tar stream with exactly what `nnUNetv2_train ... --c` needs.

How it works
- What goes in (read in nnunetv2 2.8.1's run_training.py and nnUNetTrainer.py): from
  `$nnUNet_preprocessed/<dataset>/` the plans file and dataset.json (read by get_trainer_from_args),
  splits_final.json (without it do_split draws a new split), dataset_fingerprint.json (copied by
  on_train_start: a missing one ends the start), gt_segmentations/ (the final validation's
  reference) and the configuration's data folder (`data_identifier`, following `inherits_from`);
  from `$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/` its top-level files and each
  fold folder (checkpoints, training logs, progress.png, debug.json, validation); a cascade stage also
  gets `<trainer>__<plans>__<previous stage>/predicted_next_stage/<configuration>/`. `--with-raw` adds
  `$nnUNet_raw/<dataset>/`. A missing piece is refused (PackError, exit 2) naming the file.
- Links: the paths the job names (the plans file, the data folder, the fold folder...) are taken as they
  are, links followed (the admin's choice, like a linked state_dir). Inside the folders pack walks, a
  link is followed only when its target stays inside the roots (raw, preprocessed, results, resolved) or
  the walked folder; one pointing elsewhere is left out and said: nnU-Net writes no links, and following
  one would carry a file from outside the job (~/.ssh, /etc) to another machine, or walk all of `/`.
- The archive is written by pack_stream.py: two passes (hash, then write), constant memory.
- A consistent snapshot of a running training: the fold folder's files that nnU-Net rewrites in place
  (progress.png, debug.json) are read once, when collected, and kept: every fold-folder file that still
  fits in CAPTURE_BUDGET (walk order: a fold's top level, then validation/); the rest are read again in
  each pass. Each checkpoint is opened once, verified through that open file (checkpoints.verify: zip
  directory, every storage, CRCs) and streamed from the same open file, so an atomic rewrite by the
  supervisor's launcher (a rename) cannot change what is packed. A checkpoint that does not verify is
  being written (stock nnU-Net writes in place): it is polled until it verifies, for up to
  `wait_seconds`, else left out, and `--c` will resume from the next one in nnU-Net's order.
- `-o FILE` is written under a temporary name beside FILE and renamed at the end (an existing FILE is
  moved aside, never overwritten); `-o -` streams to stdout, and a reader that goes away early (`| head`)
  ends the pack quietly with 141 (cli.main's closed-pipe exit). Progress goes to stderr on a terminal.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from supervisor.commands import pack_manifest as mf
from supervisor.commands.pack_stream import CAPTURE_BUDGET, PackError, Source, write
from supervisor.integrations.checkpoints import verify
from supervisor.config import folds as fold_lists
from supervisor.config.job import CHECKPOINT_ORDER, cross_validation


WAIT_SECONDS = 120


@dataclass
class Spec:
    dataset: str
    configuration: str
    folds: list
    trainer: str = "nnUNetTrainer"
    plans: str = "nnUNetPlans"
    roots: dict = field(default_factory=dict)  # raw / preprocessed / results -> Path or None
    with_raw: bool = False
    device: str | None = None


def _resolve_dataset(ds: str, roots: dict) -> str:
    from supervisor.config.job import dataset_name
    return dataset_name(SimpleNamespace(training=SimpleNamespace(dataset=ds),
                                        paths=SimpleNamespace(raw=roots.get("raw"), results=roots.get("results"),
                                                              preprocessed=roots.get("preprocessed"))))


def spec_from_config(cfg, folds: list | None = None, with_raw: bool = False) -> Spec:
    roots = {"raw": cfg.paths.raw, "preprocessed": cfg.paths.preprocessed, "results": cfg.paths.results}
    return Spec(_resolve_dataset(cfg.training.dataset, roots), cfg.training.configuration,
                folds or [cfg.training.fold], cfg.training.trainer, cfg.training.plans, roots, with_raw,
                cfg.training.device)


def spec_from_env(dataset: str, configuration: str, folds: list, trainer: str, plans: str,
                  with_raw: bool = False, env=None) -> Spec:
    env = os.environ if env is None else env
    roots = {}
    for root, var in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed"), ("results", "nnUNet_results")):
        roots[root] = Path(env[var]).absolute() if env.get(var) else None
        if roots[root] is None and (root != "raw" or with_raw):
            raise PackError(f"{var} is not set: export it (as for nnUNetv2_train) or use --config")
    return Spec(_resolve_dataset(dataset, roots), configuration, folds, trainer, plans, roots, with_raw)


def parse_folds(text: str) -> list:
    try:
        return fold_lists.parse_folds(text)
    except ValueError as e:
        raise PackError(f"--folds: {e}") from None


def configuration(plans_path: Path, name: str) -> dict:
    """The plans' configuration `name` with its `inherits_from` chain merged (as nnU-Net's PlansManager)."""
    from supervisor.integrations.plans import PlansError, configuration as merged

    try:
        return merged(plans_path, name)
    except PlansError as e:
        raise PackError(str(e)) from None


def _within(path: Path, allowed: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(real == a or real.startswith(a.rstrip("/") + "/") for a in allowed)


def _walk(top: Path, root_dir: Path, root: str, allowed: tuple[str, ...], say, recursive: bool = True,
          ) -> list[Source]:
    """The regular files below `top`, sorted; links followed only inside `allowed` + top (else said)."""
    allowed = (*allowed, os.path.realpath(top))
    out, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a link loop
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = [n for n in sorted(dirnames) if recursive and _followable(Path(dirpath) / n, allowed, say)]
        for name in sorted(filenames):
            if name.startswith(".") and ".tmp" in name:
                continue  # an atomic writer's temporary file (a checkpoint's: job.CHECKPOINT_TEMP), not training
            p = Path(dirpath) / name
            if _followable(p, allowed, say) and p.is_file():
                out.append(Source(root, p.relative_to(root_dir).as_posix(), p))
    return out


def _followable(p: Path, allowed: tuple[str, ...], say) -> bool:
    if not p.is_symlink() or _within(p, allowed):
        return True
    say(f"pack: left out {p}: a link to {os.path.realpath(p)}, outside nnUNet_raw, nnUNet_preprocessed "
        "and nnUNet_results")
    return False


def _need(path: Path, what: str, is_dir: bool = False) -> Path:
    if not (path.is_dir() if is_dir else path.is_file()):
        raise PackError(f"cannot pack: {path} not found ({what})")
    return path


def _open_checkpoint(path: Path, wait_seconds: float, say) -> object | None:
    """The checkpoint, open and verified, or None when it stayed incomplete for wait_seconds."""
    deadline = time.monotonic() + wait_seconds
    while True:
        fh = open(path, "rb")
        why = verify(fh)
        if why is None:
            fh.seek(0)
            return fh
        fh.close()
        if time.monotonic() >= deadline:
            say(f"pack: {path.name} in {path.parent} does not verify ({why}); left out")
            return None
        say(f"pack: {path.name} is incomplete ({why}): being written? waiting for it")
        time.sleep(2)  # polling a file another process writes; nothing to wait on but time


def collect(spec: Spec, wait_seconds: float = WAIT_SECONDS, say=lambda s: None) -> tuple[list[Source], list[dict]]:
    """Every file to pack (fold folders captured consistently) and per fold what `--c` resumes from."""
    pre_root, res_root = spec.roots.get("preprocessed"), spec.roots.get("results")
    allowed = tuple(os.path.realpath(r) for r in spec.roots.values() if r is not None)
    pre = _need(Path(pre_root) / spec.dataset, "the preprocessed dataset", is_dir=True)
    plans = _need(pre / f"{spec.plans}.json", "the plans file")
    conf = configuration(plans, spec.configuration)
    sources = [Source("preprocessed", f"{spec.dataset}/{n}", _need(pre / n, why)) for n, why in (
        (f"{spec.plans}.json", "the plans file"), ("dataset.json", "read by nnUNetv2_train"),
        ("dataset_fingerprint.json", "copied by nnU-Net at every start"),
        ("splits_final.json", "without it nnU-Net draws a NEW split: the fold would validate on cases it trained on"))]
    for sub, why in ((conf.get("data_identifier"), "the configuration's preprocessed data"),
                     ("gt_segmentations", "the final validation's reference")):
        if not isinstance(sub, str):
            raise PackError(f"{plans}: configuration {spec.configuration!r} has no data_identifier")
        sources += _walk(_need(pre / sub, why, is_dir=True), Path(pre_root), "preprocessed", allowed, say)
    base = Path(res_root) / spec.dataset
    tdir = base / f"{spec.trainer}__{spec.plans}__{spec.configuration}"
    if conf.get("previous_stage"):
        prev = base / f"{spec.trainer}__{spec.plans}__{conf['previous_stage']}" / "predicted_next_stage" / spec.configuration
        sources += _walk(_need(prev, "a cascade stage trains on the previous stage's predictions", is_dir=True),
                         Path(res_root), "results", allowed, say)
    if spec.with_raw:
        sources += _walk(_need(Path(spec.roots["raw"]) / spec.dataset, "--with-raw", is_dir=True),
                         Path(spec.roots["raw"]), "raw", allowed, say)
    if tdir.is_dir():
        sources += [s for s in _walk(tdir, Path(res_root), "results", allowed, say, recursive=False)
                    if not s.path.name.startswith(".")]
    folds, budget = [], CAPTURE_BUDGET
    for fold in spec.folds:
        fdir = _need(tdir / f"fold_{fold}", "the fold folder: nothing to continue", is_dir=True)
        resume = None
        for s in _walk(fdir, Path(res_root), "results", allowed, say):
            if s.path.parent == fdir and s.path.name in CHECKPOINT_ORDER:
                s.fh = _open_checkpoint(s.path, wait_seconds, say)
                if s.fh is None:
                    continue
                order = CHECKPOINT_ORDER.index(s.path.name)
                if resume is None or order < resume[0]:
                    resume = (order, s)
            elif s.path.stat().st_size <= budget:
                with open(s.path, "rb") as fh:
                    data = fh.read(budget + 1)  # it may have grown since: never more than the budget
                if len(data) <= budget:
                    s.data, budget = data, budget - len(data)
            sources.append(s)
        info = None
        if resume is not None:
            info = mf.read_checkpoint(resume[1].fh)
            resume[1].fh.seek(0)
        folds.append({"fold": fold, "path": fdir.relative_to(res_root).as_posix(),
                      "resume": resume[1].path.name if resume else None, **(info or {})})
    return sources, folds


def pack_to(dest: str, spec: Spec, wait_seconds: float = WAIT_SECONDS, quiet: bool = False, say=None) -> dict:
    """Pack to the path `dest` (temporary name, then renamed; an existing file is moved aside) or '-'."""
    from supervisor.integrations.store import fsync_dir, move_aside, temp_beside

    say = say or (lambda s: print(s, file=sys.stderr))
    sources, folds = collect(spec, wait_seconds, say)
    try:
        if dest == "-":
            report = write(sys.stdout.buffer, spec, sources, folds, quiet)
            sys.stdout.buffer.flush()
        else:
            path = Path(dest).absolute()
            if not path.parent.is_dir():
                raise PackError(f"cannot write {path}: folder {path.parent} does not exist")
            fd, tmp = temp_beside(path.parent, path.name)
            try:
                with os.fdopen(fd, "wb") as out:
                    report = write(out, spec, sources, folds, quiet)
                    out.flush()
                    os.fsync(out.fileno())
                if os.path.lexists(path):
                    say(f"pack: moved the existing {path.name} aside to {move_aside(path, 'previous').name}")
                os.replace(tmp, path)
                fsync_dir(path.parent)
            except BaseException:
                if tmp.exists():
                    tmp.unlink()
                raise
    finally:
        for s in sources:
            if s.fh is not None:
                s.fh.close()
    return {**report, "folds": folds}


def check_findings(cfg, job_cfgs: list | None = None, version_rules: bool = True) -> list[tuple[str, str]]:
    """For `check`: (level, text) about the configured fold's resume checkpoint (each of a queue's jobs',
    `job_cfgs`, in one probe) loaded here with this torch/numpy, compared with the manifest unpack left
    beside the fold folders (if any)."""
    from supervisor.commands.unpack import SAVED_MANIFEST, findings, run_probe
    from supervisor.config import job

    job_cfgs, out, checkpoints, source = job_cfgs or [cfg], [], [], None
    several = len({c.training.configuration for c in job_cfgs}) > 1  # then "fold 1 (3d_lowres)"
    for c in job_cfgs:
        fold = f"{c.training.fold} ({c.training.configuration})" if several else c.training.fold
        ck = job.resume_checkpoint(c)
        if ck is None:
            out.append(("ok", mf.describe_resume(fold, None, None)))
            continue
        checkpoints.append([fold, str(ck)])
        try:
            source = source or json.loads((ck.parent.parent / SAVED_MANIFEST).read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            pass
    if not checkpoints:
        return out
    info, why = run_probe(cfg.training.trainer, checkpoints, job.build_env(cfg))
    return out + findings(info, why, source, cfg.training.trainer, cfg.training.device, version_rules)


def cli(args, cfg) -> int:
    """`cardiacseg-train pack`: 0 when the archive is complete, 2 (ExitCode.CONFIG) on bad input."""
    def err(msg: str) -> int:
        print(f"cardiacseg-train pack: {msg}", file=sys.stderr)
        return 2

    try:
        folds = parse_folds(args.folds) if args.folds else None
        if cfg is not None:
            if args.job:
                return err("give either --config or DATASET CONFIGURATION FOLD, not both")
            spec = spec_from_config(cfg, folds, args.with_raw)
        elif len(args.job) != 3:
            return err("expected --config PATH, or DATASET CONFIGURATION FOLD (like nnUNetv2_train)")
        else:
            spec = spec_from_env(args.job[0], args.job[1], folds or parse_folds(args.job[2]), args.trainer,
                                 args.plans, args.with_raw)
        if folds:  # --folds: `all` is every fold of the split, and a fold it lacks is refused
            try:
                spec.folds = fold_lists.expand(folds, *cross_validation(spec.roots["preprocessed"] / spec.dataset))
            except ValueError as e:
                raise PackError(f"--folds {args.folds}: {e}") from None
        if args.output == "-" and sys.stdout.isatty():
            return err("refusing to write an archive to a terminal: use -o FILE, or pipe it (| ssh host ...)")
        report = pack_to(args.output, spec, args.wait_seconds, quiet=args.quiet)
    except PackError as e:
        return err(str(e))
    except BrokenPipeError:
        raise  # `-o -` and the reader went away: cli.main's quiet closed-pipe exit, not an error of ours
    except OSError as e:
        return err(f"cannot pack: {e.filename or ''}: {e.strerror or e}")
    where = "stdout" if args.output == "-" else args.output
    print(f"pack: {report['files']} files, {report['bytes'] / 1e9:.2f} GB -> {where}", file=sys.stderr)
    for f in report["folds"]:
        print("pack: " + mf.describe_resume(f["fold"], f["resume"], f), file=sys.stderr)
    return 0
