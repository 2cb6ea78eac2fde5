"""`cardiacseg-train` and `python -m supervisor`: the command line (commands/cli.py).

`run` first of all installs the start-up signal recorder (daemon/early_signals.py): a signal during the
imports and the configuration is recorded for the loop instead of ending the process."""
import sys


def entry() -> int:
    if sys.argv[1:2] == ["run"]:
        from supervisor.daemon import early_signals

        early_signals.install()
    from supervisor.commands.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
