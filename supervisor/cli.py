"""The `cardiacseg-train` command: run | status | check | install-unit | uninstall-unit | demo.

Exit codes of `run` (the systemd unit depends on them):
  0  done: target reached, training completed, or stopped on request
  1  internal error (a bug in the supervisor: the only case that prints a traceback)
  2  configuration error (config.toml, or the trainer reported a missing dataset/trainer/plans)
  3  gave up (restart budget exhausted)
  4  another supervisor already runs on this state directory
`status` exits 0, or 2 when the config cannot be read. `check` exits 0 when nothing is fatal, else 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import config as config_mod
from . import logs
from .events import ExitCode


def _load(path: str):
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as e:
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)


def cmd_run(args) -> int:
    from .daemon import Daemon
    from .store import LockedError

    cfg = _load(args.config)
    logs.setup(cfg.logging.level)
    try:
        return Daemon(cfg).run()
    except config_mod.ConfigError as e:  # found at start-up (e.g. the plans file), before training
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except LockedError as e:
        print(f"cardiacseg-train: {e}", file=sys.stderr)
        return ExitCode.LOCKED
    except PermissionError as e:
        print(f"cardiacseg-train: cannot write the state directory {cfg.paths.state_dir} "
              f"([paths].state_dir in {cfg.path}): {e.strerror}", file=sys.stderr)
        return ExitCode.CONFIG


def cmd_status(args) -> int:
    from .status import gather, render

    cfg = _load(args.config)
    info = gather(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render(info))
    return 0


def cmd_check(args) -> int:
    from .check import render, run_checks

    cfg = _load(args.config)
    problems = run_checks(cfg)
    print(render(problems))
    return ExitCode.CONFIG if any(p.fatal for p in problems) else 0


def cmd_install(args) -> int:
    from .install import install

    return install(args.root, user=args.user, create_user=not args.no_create_user)


def cmd_uninstall(args) -> int:
    from .install import uninstall

    return uninstall(args.root)


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cardiacseg-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="supervise training in the foreground (what systemd starts)")
    r.add_argument("--config", required=True, help="path to config.toml")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="where training stands (works with or without the daemon)")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_status)
    c = sub.add_parser("check", help="preflight: list every problem at once")
    c.add_argument("--config", required=True)
    c.set_defaults(fn=cmd_check)
    i = sub.add_parser("install-unit", help="install the systemd units, user and /etc config")
    i.add_argument("--root", default="/", help="install below this root (default /)")
    i.add_argument("--user", default="cardiacseg", help="service user (default cardiacseg)")
    i.add_argument("--no-create-user", action="store_true", help="do not run useradd")
    i.set_defaults(fn=cmd_install)
    u = sub.add_parser("uninstall-unit", help="move the unit files aside (config and state are kept)")
    u.add_argument("--root", default="/")
    u.set_defaults(fn=cmd_uninstall)
    d = sub.add_parser("demo", help="synthetic dataset + real nnU-Net on the CPU under the supervisor")
    d.add_argument("--dir", default="demo-run", help="working folder (default ./demo-run)")
    d.add_argument("--no-crash", action="store_true", help="skip the injected crash")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
