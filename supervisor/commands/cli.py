"""The `cardiacseg-train` command: run | status | check | pack | unpack | install-unit | uninstall-unit |
plot | slurm-script | demo.

The exit codes of `run` (the systemd unit depends on them) are core/exit_codes.py's; --help lists them.
`status` exits 0, or 2 when the config cannot be read. `pack`/`unpack` exit 0, or 2 on bad input (nothing placed). `check` exits 0 when nothing is fatal, else 2.
Any command whose output pipe is closed early (`status | head`) exits 141 without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import structlog

from supervisor.config import loader as config_mod
from supervisor.core import queue_policy
from supervisor.daemon import queue_master
from supervisor.integrations import environment, log_setup
from supervisor.core.exit_codes import ExitCode, exit_code_help


# Where `run`, `status`, `check`, `plot` and `slurm-script` look without --config, in this order: the
# current folder (a project's own config), then the service's (what `install-unit` writes).
DEFAULT_CONFIGS = ("config.toml", "/etc/cardiacseg-train/config.toml")


def default_config() -> str:
    """The first of DEFAULT_CONFIGS that exists (said on stderr, so the reader knows which file it is); exit 2
    naming both places when there is none."""
    for path in DEFAULT_CONFIGS:
        if os.path.isfile(path):
            print(f"cardiacseg-train: no --config given: using {os.path.abspath(path)}", file=sys.stderr)
            return path
    print(f"cardiacseg-train: no --config given, and neither ./{DEFAULT_CONFIGS[0]} nor {DEFAULT_CONFIGS[1]} "
          "exists: give --config FILE (`config.toml` in the repository is the documented example)", file=sys.stderr)
    sys.exit(ExitCode.CONFIG)


def _load(path: str | None):
    try:
        return queue_master.concrete(config_mod.load(path if path is not None else default_config()))
    except config_mod.ConfigError as e:
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)


def cmd_run(args) -> int:
    from supervisor.daemon.loop import Daemon
    from supervisor.integrations.store import LockedError

    shape = _job_shape(args)
    cfg = shape(_load(args.config))
    log_setup.setup(cfg.logging.level, trainer_output=not args.quiet_trainer)
    if os.environ.get(queue_master.ENV):  # one job of a queue, started by the queue's master process
        spec = json.loads(os.environ[queue_master.ENV])
        structlog.contextvars.bind_contextvars(job=f"{spec['configuration']}/{spec['fold']}")
    elif queue_policy.is_queue(cfg):
        return _run_queue(cfg, quiet_trainer=args.quiet_trainer)
    try:
        return Daemon(cfg, take_over=args.take_over, shape=shape).run()
    except config_mod.ConfigError as e:  # found at start-up (e.g. the plans file), before training
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        environment.record_refused(cfg.paths.state_dir, str(e))  # for `status`
        return ExitCode.CONFIG
    except LockedError as e:
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        return ExitCode.LOCKED
    except PermissionError as e:
        print(f"cardiacseg-train: cannot write the state directory {cfg.paths.state_dir} "
              f"([paths].state_dir in {cfg.path}): {e.strerror}", file=sys.stderr)
        return ExitCode.CONFIG


def _job_shape(args):
    """What makes the file's config this process's job: a fold of `slurm-script --folds` (an array task),
    or a queue's job (CARDIACSEG_QUEUE_JOB: its fold, GPU slot and state directory). Applied at start and
    to every reload, so a reload keeps them."""
    import dataclasses

    spec = json.loads(os.environ[queue_master.ENV]) if os.environ.get(queue_master.ENV) else None

    def shape(cfg):
        cfg = queue_master.concrete(cfg)  # a reload reads the file again
        if args.fold is not None:
            # one fold of one configuration: a [queue] in the same config must not run in every array task
            cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, fold=args.fold),
                                      queue=dataclasses.replace(cfg.queue, folds=(), configurations=(), gpus=()))
        return queue_master.job_config(cfg, spec) if spec is not None else cfg
    return shape


def _run_queue(cfg, quiet_trainer: bool = False) -> int:
    from supervisor.integrations.sdnotify import Notifier
    from supervisor.integrations.store import Lock, LockedError, safe_mkdir

    problems, versions = queue_master.start_problems(cfg, log_setup.get())
    if problems:
        err = config_mod.ConfigError(cfg.path, problems)
        print(f"cardiacseg-train: {err}", file=sys.stderr)
        environment.record_refused(cfg.paths.state_dir, str(err))  # for `status`
        return ExitCode.CONFIG
    safe_mkdir(cfg.paths.state_dir, follow_symlink=True)
    lock = Lock(cfg.paths.state_dir)
    try:
        lock.acquire()
    except LockedError as e:
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        return ExitCode.LOCKED
    environment.clear_refused(cfg.paths.state_dir)
    try:
        return queue_master.QueueRunner(cfg, log_setup.get(), Notifier(), quiet_trainer=quiet_trainer,
                                        nnunetv2=versions.nnunetv2 if versions else None).run()
    finally:
        lock.release()


def cmd_status(args) -> int:
    from supervisor.commands.status import gather, render
    from supervisor.commands.status_queue import gather_queue, render_queue

    cfg = _load(args.config)
    many = queue_policy.is_queue(cfg)
    info = gather_queue(cfg) if many else gather(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_queue(info) if many else render(info))
    return 0


def cmd_slurm_script(args) -> int:
    from supervisor.integrations import slurm

    cfg = _load(args.config)
    folds = []
    if args.folds:
        from supervisor.config.folds import parse_folds
        from supervisor.config.job import expand_folds
        try:
            folds = expand_folds(cfg, parse_folds(args.folds))  # `all`: every fold of splits_final.json
        except ValueError as e:
            print(f"cardiacseg-train: --folds {args.folds}: {e}", file=sys.stderr)
            return ExitCode.CONFIG
        if len(folds) > 1 and (sd := slurm.explicit_state_dir(cfg)):
            print(f"cardiacseg-train: [paths] state_dir = {sd!r} would be shared by the array's tasks (one job per "
                  "state directory); leave it unset: inside SLURM the default is state/slurm-<job>_<task>",
                  file=sys.stderr)
            return ExitCode.CONFIG
    if args.time is not None and slurm.parse_time(args.time) is None:
        print(f"cardiacseg-train: --time {args.time!r}: expected SLURM's format (MM, HH:MM:SS, D-HH:MM:SS)",
              file=sys.stderr)
        return ExitCode.CONFIG
    try:
        text, warnings = slurm.sbatch_script(
            cfg, command=[sys.executable, "-m", "supervisor"], partition=args.partition, time=args.time,
            gpus=args.gpus, cpus_per_task=args.cpus_per_task, mem=args.mem, folds=folds)
    except slurm.ScriptError as e:  # a value that would be read otherwise than written: no script at all
        print(f"cardiacseg-train: slurm-script for {cfg.path}: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    for w in warnings:
        print(f"cardiacseg-train: warning: {w}", file=sys.stderr)
    print(text, end="")
    return 0


def _fold_value(text: str):
    from supervisor.config.folds import parse_fold
    try:
        return parse_fold(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_check(args) -> int:
    from supervisor.commands.check import render, run_checks

    cfg = _load(args.config)
    problems = run_checks(cfg, quick=args.quick, say=lambda text: print(f"check: {text} ...", file=sys.stderr,
                                                                        flush=True))
    print(render(problems))
    return ExitCode.CONFIG if any(p.fatal for p in problems) else 0


def cmd_plot(args) -> int:
    from supervisor.integrations import plot

    cfg = _load(args.config)
    return plot.main(cfg, args.output)


def cmd_pack(args) -> int:
    from supervisor.commands import pack

    return pack.cli(args, _load(args.config) if args.config else None)


def cmd_unpack(args) -> int:
    from supervisor.commands import unpack

    return unpack.cli(args, _load(args.config) if args.config else None)


def cmd_install(args) -> int:
    from supervisor.commands.install import install

    return install(args.root, user=args.user, create_user=not args.no_create_user)


def cmd_uninstall(args) -> int:
    from supervisor.commands.install import uninstall

    return uninstall(args.root)


def cmd_demo(args) -> int:
    from supervisor.commands.demo import main as demo_main

    return demo_main(args)


def version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib import metadata

    try:
        return metadata.version("cardiacseg-train")
    except metadata.PackageNotFoundError:
        from supervisor import __version__
        return __version__


CONFIG_HELP = ("the job's config.toml (config.toml in the repository documents every key); default: "
               f"./{DEFAULT_CONFIGS[0]}, else {DEFAULT_CONFIGS[1]}")
OPTIONAL_CONFIG_HELP = "the job's config.toml (config.toml in the repository documents every key)"

SUBCOMMANDS = {  # name: (one-line help, description for `name --help`)
    "run": ("supervise training in the foreground (what systemd starts)",
            "Start nnU-Net training as [training] describes and keep it alive: restart it with --c after a "
            "crash, step the batch size down after a CUDA OOM, pause it when the GPU is too hot, and stop it at "
            "a safe point once the EMA pseudo Dice reaches [target] ema_dice. Logs go to stderr, one event "
            "per line; Ctrl-C (or SIGTERM) stops the trainer gracefully."),
    "status": ("where training stands (works with or without the daemon)",
               "Show the state, epoch, EMA and per-class Dice, ETAs, batch size, restarts and every attempt. "
               "Reads state.json and the training logs; never changes anything, and works while `run` is "
               "running, after it ended, or for a run that was never supervised."),
    "check": ("preflight: list every problem at once",
              "Test what `run` needs before it starts: the folders and what must be writable, the dataset "
              "and plans, the training command and the trainer class (looked up as nnU-Net does), free space "
              "for checkpoints, known-bad versions, RAM and /dev/shm for the workers, the GPUs' health and "
              "the thermal guard. Prints one line per finding; exits 2 when anything is fatal, else 0."),
    "install-unit": ("install the systemd units, user and /etc config",
                     "Write cardiacseg-train.service and cardiacseg-train@.service pointing at this install, "
                     "create the service user (as root), test as that user that it can run this install (else "
                     "exit 2, nothing written), and copy the example config to /etc/cardiacseg-train/config.toml."),
    "uninstall-unit": ("move the unit files aside (config and state are kept)",
                       "Move the installed unit files aside; the config and the state directory are kept."),
    "plot": ("draw the progress plot (EMA, per-class Dice, restarts, OOM steps, heat, the stop)",
             "Draw EMA and per-class pseudo Dice against epochs across all attempts, the target line, a marker "
             "for each restart, batch-size step-down, thermal pause/stop and the stop, and epoch times. The "
             "daemon also redraws <state_dir>/progress.png after every epoch."),
    "pack": ("pack a training (data, plans, split, checkpoints, logs) into one verified archive",
             "Write one tar archive with exactly what `nnUNetv2_train ... --c` needs on another machine: from "
             "nnUNet_preprocessed the plans, dataset.json, dataset_fingerprint.json, splits_final.json, the "
             "configuration's data and gt_segmentations; from nnUNet_results the fold folder. MANIFEST.json "
             "(first in the archive) records every file's size and sha256, the source's versions and what each "
             "fold resumes from. Safe while training runs. `-o -` streams to stdout. Exits 2 on bad input."),
    "unpack": ("verify a pack archive and move its files into place",
               "Check every file's size and sha256 while extracting into temporary names; only when the whole "
               "archive verified are the files moved into place (a different existing file is moved aside, "
               "never overwritten). Then load each fold's resume checkpoint with this machine's torch and numpy "
               "and print what `--c` will resume from. Exits 2 when the archive is refused (nothing placed) or "
               "the checkpoint will not load here."),
    "slurm-script": ("print an sbatch script that runs this config on a SLURM cluster, requeued on time limits",
                     "Print an sbatch script for this config: --requeue, --open-mode=append, --signal=B:USR1@S "
                     "(S = the measured median epoch time + stop.timeout_seconds + 60 s, at least 60 s; 300 s "
                     "per epoch when none was measured yet), the GPUs and CPUs asked for, and a job array over "
                     "--folds. It execs `run`: on SIGUSR1 or SIGTERM the supervisor stops the trainer at a safe "
                     "point, requeues the job with `scontrol requeue`, and the requeued run continues with --c. "
                     "Submit it with `cardiacseg-train slurm-script --config C > job.sh && sbatch job.sh`."),
    "demo": ("synthetic dataset + real nnU-Net on the CPU under the supervisor",
             "Make a tiny synthetic dataset, plan and preprocess it, and supervise real nnU-Net training on "
             "the CPU with an injected crash and a reachable Dice target; then print `status`."),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cardiacseg-train", description=__doc__.split("\n\n")[0],
                                epilog="`run` " + exit_code_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="`cardiacseg-train COMMAND --help` describes each")

    def add(name):
        short, long = SUBCOMMANDS[name]
        return sub.add_parser(name, help=short, description=long,
                              epilog=exit_code_help() if name == "run" else None,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    r = add("run")
    r.add_argument("--config", default=None, help=CONFIG_HELP)
    r.add_argument("--quiet-trainer", action="store_true",
                   help="do not echo the trainer's own output (src=trainer lines), whatever [logging] level "
                        "says; it is still kept in <state_dir>/attempts/attempt-NNNN.log")
    r.add_argument("--take-over", action="store_true",
                   help="another trainer (e.g. a hand-started nnUNetv2_train ... --c) trains this fold: stop it "
                        "at its next safe point, then continue with --c (without it, run refuses: exit 2); never "
                        "one that another supervisor runs")
    r.add_argument("--fold", type=_fold_value, default=None,
                   help="train this fold instead of [training] fold (a job array's task: "
                        "--fold $SLURM_ARRAY_TASK_ID)")
    r.set_defaults(fn=cmd_run)
    s = add("status")
    s.add_argument("--config", default=None, help=CONFIG_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    s.set_defaults(fn=cmd_status)
    c = add("check")
    c.add_argument("--config", default=None, help=CONFIG_HELP)
    c.add_argument("--quick", action="store_true",
                   help="seconds instead of a minute: no child process imports torch (the trainer class is "
                        "found by a scan of nnU-Net's files; torch's CUDA build and the resume checkpoint's "
                        "load are not tested)")
    c.set_defaults(fn=cmd_check)
    i = add("install-unit")
    i.add_argument("--root", default="/", help="install below this root (default /)")
    i.add_argument("--user", default="cardiacseg", help="service user (default cardiacseg)")
    i.add_argument("--no-create-user", action="store_true", help="do not run useradd")
    i.set_defaults(fn=cmd_install)
    u = add("uninstall-unit")
    u.add_argument("--root", default="/", help="the root the units were installed below (default /)")
    u.set_defaults(fn=cmd_uninstall)
    pl = add("plot")
    pl.add_argument("--config", default=None, help=CONFIG_HELP)
    pl.add_argument("-o", "--output", default=None, help="PNG to write (default <state_dir>/progress.png)")
    pl.set_defaults(fn=cmd_plot)
    pk = add("pack")
    pk.add_argument("job", nargs="*", metavar="DATASET CONFIGURATION FOLD",
                    help="without --config: the job as nnUNetv2_train takes it (folders from nnUNet_raw, "
                         "nnUNet_preprocessed, nnUNet_results)")
    pk.add_argument("--config", default=None, help=OPTIONAL_CONFIG_HELP)
    pk.add_argument("-o", "--output", required=True, help="archive to write; - streams to stdout")
    pk.add_argument("-tr", dest="trainer", default="nnUNetTrainer", help="trainer class (without --config)")
    pk.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier (without --config)")
    pk.add_argument("--folds", default=None, help="several folds, e.g. 0,1,2,3,4")
    pk.add_argument("--with-raw", action="store_true", help="also pack nnUNet_raw/<dataset>")
    pk.add_argument("--wait-seconds", type=float, default=120,
                    help="how long to wait for a checkpoint being written before leaving it out (default 120)")
    pk.add_argument("--quiet", action="store_true", help="no progress line, even on a terminal")
    pk.set_defaults(fn=cmd_pack)
    up = add("unpack")
    up.add_argument("file", metavar="FILE", help="the archive; - reads stdin")
    up.add_argument("--config", default=None, help=OPTIONAL_CONFIG_HELP + "; its [paths] are the destination")
    up.add_argument("--to-raw", default=None, help="nnUNet_raw folder (default: the config's, else $nnUNet_raw)")
    up.add_argument("--to-preprocessed", default=None, help="nnUNet_preprocessed folder")
    up.add_argument("--to-results", default=None, help="nnUNet_results folder")
    up.add_argument("--dry-run", action="store_true", help="verify the whole archive; write nothing")
    up.add_argument("--skip-load-check", action="store_true",
                    help="do not load the resume checkpoints with this torch/numpy afterwards")
    up.add_argument("--quiet", action="store_true", help="no progress line, even on a terminal")
    up.set_defaults(fn=cmd_unpack)
    ss = add("slurm-script")
    ss.add_argument("--config", default=None, help=CONFIG_HELP)
    ss.add_argument("--partition", default=None, help="#SBATCH --partition (default: the cluster's)")
    ss.add_argument("--time", default=None, metavar="HH:MM:SS", help="#SBATCH --time, the job's time limit")
    ss.add_argument("--gpus", type=int, default=None, metavar="N",
                    help="#SBATCH --gres=gpu:N (default: [training] num_gpus for device cuda, else none)")
    ss.add_argument("--cpus-per-task", type=int, default=None, metavar="C",
                    help="#SBATCH --cpus-per-task; nnUNet_n_proc_DA follows it unless [environment] sets it")
    ss.add_argument("--mem", default=None, metavar="M", help="#SBATCH --mem, e.g. 64G")
    ss.add_argument("--folds", default=None, metavar="0,1,2",
                    help="a job array with one task per fold (run --fold $SLURM_ARRAY_TASK_ID): 0,1,2, 0-4, "
                         "or all (every fold of splits_final.json)")
    ss.set_defaults(fn=cmd_slurm_script)
    d = add("demo")
    d.add_argument("--dir", default="demo-run", help="working folder (default ./demo-run)")
    d.add_argument("--no-crash", action="store_true", help="skip the injected crash")
    d.set_defaults(fn=cmd_demo)
    return p


# `status | head`: the reader went away. Like a command killed by SIGPIPE, exit 128 + 13, silently.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return rc


if __name__ == "__main__":
    sys.exit(main())
