"""Is the trainer class there? What `run` asks before it starts nnU-Net, and how `check` words the answer.

How it works
- nnU-Net finds `-tr NAME` by importing every module under nnunetv2/training/nnUNetTrainer and the
  folders of nnUNet_extTrainer (recursive_find_trainer_class_by_name). That costs a torch import: 10 s
  on an idle machine, 80 s on a busy one, and then the run ends with a configuration error.
- So `run` first scans the .py files of those folders for `class NAME(` (milliseconds, nothing
  imported). A hit is taken as found. Only a miss asks nnU-Net itself, in supervisor/trainer/probe.py's
  child process (probes.ask: bounded by probes.TIMEOUT_S, cut short by a signal), and only nnU-Net's own
  "not found" refuses the run (ConfigError: exit 2, with where it looked and the close matches). A probe
  that cannot answer lets the run go on: the trainer then reports it, and the run's last line names the
  trainer's final error and the attempt log.
- All of it happens before the supervisor's first decision (daemon/loop.py), so it never holds up the
  loop; and only for nnU-Net's own commands (nnUNetv2_train, cardiacseg-train-nnunet): a command of your
  own may read -tr however it likes.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re

from supervisor.config import job
from supervisor.integrations import probes

NNUNET_COMMANDS = ("nnUNetv2_train", "cardiacseg-train-nnunet")
_CLASS = re.compile(r"^class\s+(\w+)\s*\(", re.M)


def class_names(folders: list[str]) -> list[str]:
    """Class names defined in the .py files under folders (a text scan: nothing is imported)."""
    names: set[str] = set()
    for top in folders:
        for root, _dirs, files in os.walk(top):
            for f in files:
                if f.endswith(".py"):
                    try:
                        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                            names.update(_CLASS.findall(fh.read()))
                    except OSError:
                        pass
    return sorted(names)


def search_folders(env: dict) -> list[str]:
    """Where nnU-Net looks, in its order: its own trainer package, then nnUNet_extTrainer's folders. The
    package is located without importing it (importing nnunetv2's trainers imports torch)."""
    spec = importlib.util.find_spec("nnunetv2")
    own = [os.path.join(spec.submodule_search_locations[0], "training", "nnUNetTrainer")] \
        if spec is not None and spec.submodule_search_locations else []
    return own + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]


def not_found(name: str, info: dict) -> str | None:
    """The problem in probe.py's answer `info`, worded for a person: where nnU-Net looked, and the close
    matches; None when the class was found (or nnunetv2 itself did not import: reported elsewhere)."""
    if info.get("trainer") or "searched" not in info:
        return None
    close = difflib.get_close_matches(name, info.get("known", []), n=3, cutoff=0.75)
    return (f"training.trainer: no nnU-Net trainer class {name!r} in " + " or ".join(info["searched"])
            + ("" if len(info["searched"]) > 1 else
               " (a trainer of your own: put its folder in [environment] nnUNet_extTrainer)")
            + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
            + ("" if "not find" in (info.get("trainer_error") or "not find") else f" ({info['trainer_error']})"))


def scan(name: str, env: dict) -> tuple[str, str]:
    """`check --quick`: (level, text) from the scan alone, nothing imported."""
    folders = search_folders(env)
    known = class_names([f for f in folders if os.path.isdir(f)])
    if name in known:
        return "ok", f"trainer class {name} is defined in nnU-Net's trainer folders (--quick: found by a scan)"
    return "warning", (not_found(name, {"trainer": None, "searched": folders, "known": known})
                       + " (--quick: a scan of the files; `run` asks nnU-Net itself before it starts)")


def before_start(cfg, log, cancelled=None) -> str | None:
    """For `run`, before its first decision: the problem (a ConfigError's line) when nnU-Net has no such
    trainer class, else None. Logs what it does when it has to ask nnU-Net (that takes seconds)."""
    argv = job.resolve_command(cfg)
    if os.path.basename(argv[0]) not in NNUNET_COMMANDS:
        return None
    env = job.build_env(cfg)
    name = cfg.training.trainer
    folders = search_folders(env)
    if name in class_names([f for f in folders if os.path.isdir(f)]):
        return None
    log.info("checking_trainer_class", trainer=name, why="not defined in a file nnU-Net searches: asking nnU-Net",
             timeout_s=probes.TIMEOUT_S)
    info, why = probes.ask("probe", name, env, cancelled=cancelled)
    if info is None:
        log.warning("trainer_class_unchecked", trainer=name, why=why, effect="starting; the trainer reports it")
        return None
    return not_found(name, info)
