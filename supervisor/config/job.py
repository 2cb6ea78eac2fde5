"""The training job as nnU-Net sees it: dataset name, fold folder, checkpoints, argv and environment.

How it works: pure functions over the Config plus small, read-only filesystem lookups. The fold folder
is `$nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>/fold_<f>` (nnunetv2's
get_output_folder); `--c` loads checkpoint_final, else checkpoint_latest, else checkpoint_best
(nnunetv2/run/run_training.py: maybe_load_checkpoint), so `resume_checkpoint` mirrors that order.
No nnunetv2 import here: the supervisor stays small and starts in milliseconds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from supervisor.config.folds import expand
from supervisor.config.loader import Config

# nnU-Net's --c loads the first of these that exists (run_training.py: maybe_load_checkpoint)
CHECKPOINT_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
# The launcher saves a checkpoint to this temp name beside the old file, then renames it into place.
CHECKPOINT_TEMP = re.compile(r"^\.(checkpoint_\w+\.pth)\.tmp-(\d+)$")


def checkpoint_temp_name(name: str, pid: int) -> str:
    """The temp file the launcher (pid) writes checkpoint `name` to (CHECKPOINT_TEMP matches it)."""
    return f".{name}.tmp-{pid}"

# Variables that belong to the supervisor's own service manager, never to the trainer.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


def dataset_name(cfg: Config) -> str:
    """Dataset001_CardiacSeg stays; "1" or "001" is looked up like nnU-Net does (by DatasetXXX_ prefix)."""
    ds = cfg.training.dataset
    if not re.fullmatch(r"\d+", ds):
        return ds
    prefix = f"Dataset{int(ds):03d}_"
    for base in (cfg.paths.preprocessed, cfg.paths.raw, cfg.paths.results):
        if base is None:
            continue
        try:
            hits = sorted(p.name for p in Path(base).iterdir() if p.name.startswith(prefix))
        except OSError:
            continue
        if hits:
            return hits[0]
    return f"Dataset{int(ds):03d}"  # unresolved; `check` reports it


def fold_dir(cfg: Config) -> Path:
    return (cfg.paths.results / dataset_name(cfg) / f"{cfg.training.trainer}__{cfg.training.plans}__{cfg.training.configuration}"
            / f"fold_{cfg.training.fold}")


def attempt_log(cfg: Config, n: int) -> Path:
    """Attempt n's whole output (stdout and stderr, as the trainer wrote them)."""
    return cfg.paths.state_dir / "attempts" / f"attempt-{n:04d}.log"


def plans_file(cfg: Config) -> Path:
    return cfg.paths.preprocessed / dataset_name(cfg) / f"{cfg.training.plans}.json"


SPLITS_FILE = "splits_final.json"
NNUNET_DEFAULT_FOLDS = 5  # what nnU-Net draws when the dataset has no splits_final.json yet


def cross_validation(dataset_dir: Path) -> tuple[list[int], str]:
    """The folds of a dataset's cross-validation (one per entry of nnUNet_preprocessed/<dataset>/
    splits_final.json; nnU-Net's own 5 when it has not drawn the split yet), and where that came from."""
    path = Path(dataset_dir) / SPLITS_FILE
    default = list(range(NNUNET_DEFAULT_FOLDS))
    try:
        splits = json.loads(path.read_text())
    except FileNotFoundError:
        return default, f"{path} does not exist yet, and nnU-Net draws folds 0-{NNUNET_DEFAULT_FOLDS - 1}"
    except (OSError, ValueError) as e:
        return default, f"{path} is unreadable ({e}); nnU-Net's default is folds 0-{NNUNET_DEFAULT_FOLDS - 1}"
    if not isinstance(splits, list) or not splits:
        return default, f"{path} is not a list of splits; nnU-Net's default is folds 0-{NNUNET_DEFAULT_FOLDS - 1}"
    return list(range(len(splits))), f"{path} has {len(splits)} folds (0-{len(splits) - 1})"


def expand_folds(cfg: Config, folds: list) -> list[int]:
    """A fold list (`--folds`, `[queue] folds`) made concrete for the config's dataset: folds.expand."""
    return expand(folds, *cross_validation(plans_file(cfg).parent))


def class_names(cfg: Config) -> list[str] | None:
    """The foreground classes in the order of nnU-Net's pseudo Dice, as the dataset's dataset.json names them
    (`labels`: name -> value, or -> a list of values for a region); None when it cannot be read."""
    try:
        labels = json.loads((plans_file(cfg).parent / "dataset.json").read_text()).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    fg = [(k, v) for k, v in labels.items() if k != "background" and v != 0]
    if all(isinstance(v, int) and not isinstance(v, bool) for _k, v in fg):
        fg.sort(key=lambda kv: kv[1])  # nnU-Net's foreground labels, in label order
    return [str(k) for k, _v in fg]


def existing_checkpoints(cfg: Config) -> list[Path]:
    d = fold_dir(cfg)
    return [d / n for n in CHECKPOINT_ORDER if (d / n).is_file()]


def resume_checkpoint(cfg: Config) -> Path | None:
    """The file `--c` would load, or None (then nnU-Net starts at epoch 0)."""
    found = existing_checkpoints(cfg)
    return found[0] if found else None


def resolve_command(cfg: Config, path: str | None = None) -> list[str]:
    """The configured argv prefix, independent of the current directory (under systemd it is `/`).

    - argv[0] with a `/` that is relative (`./train.sh`, `bin/train`) is taken relative to the config
      file's folder, like every other relative path of the config; `~` is expanded.
    - a bare program name is looked up on PATH, then next to the supervisor's own interpreter (a venv
      install under systemd, whose PATH lacks the venv); otherwise left for exec to report.
    - a later element that is a relative path naming something in the config's folder (the script in
      `["python", "nnunet_train.py"]`, `scripts/x.py`) becomes absolute; options and other words stay.
    """
    base = cfg.path.parent
    exe, rest = cfg.training.command[0], list(cfg.training.command[1:])
    if exe.startswith("~"):
        exe = os.path.expanduser(exe)
    if "/" in exe:
        if not os.path.isabs(exe):
            exe = str(base / exe)
    elif shutil.which(exe, path=path) is None:
        local = Path(sys.executable).parent / exe
        if local.exists():
            exe = str(local)
    return [exe, *(_config_relative(a, base) for a in rest)]


def _config_relative(arg: str, base: Path) -> str:
    if not arg or arg.startswith(("-", "~")) or os.path.isabs(arg):
        return arg
    candidate = base / arg
    return str(candidate) if os.path.exists(candidate) else arg


def build_argv(cfg: Config, resume: bool) -> list[str]:
    argv = [*resolve_command(cfg, build_env(cfg).get("PATH")), dataset_name(cfg), cfg.training.configuration, str(cfg.training.fold),
            "-tr", cfg.training.trainer, "-p", cfg.training.plans, "-device", cfg.training.device]
    if cfg.training.num_gpus > 1:
        argv += ["-num_gpus", str(cfg.training.num_gpus)]
    if resume:
        argv.append("--c")
    argv += list(cfg.training.extra_args)
    return argv


COMPILE_CACHE = "compile-cache"  # <state_dir>/compile-cache/{inductor,triton}: torch.compile's kernels


def build_env(cfg: Config, base: dict[str, str] | None = None, overrides: dict[str, str] | None = None
              ) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in PRIVATE_ENV:
        env.pop(k, None)
    if cfg.paths.raw is not None:
        env["nnUNet_raw"] = str(cfg.paths.raw)
    env["nnUNet_preprocessed"] = str(cfg.paths.preprocessed)
    env["nnUNet_results"] = str(cfg.paths.results)
    env["CARDIACSEG_CHECKPOINT_EVERY"] = str(cfg.checkpoint.every_epochs)  # read by the default launcher
    # CUDA's default order (fastest first) may differ from NVML's and nvidia-smi's; PCI bus order makes
    # a CUDA index mean the GPU the thermal guard watches. [environment] can still override it.
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.update(cfg.environment)
    if cfg.training.compile != "auto":
        env["nnUNet_compile"] = "t" if cfg.training.compile == "on" else "f"
    # torch.compile's caches in the state directory: a restart (crash, OOM, heat, requeue) loads the kernels it
    # compiled before instead of compiling for minutes again. The default, /tmp/torchinductor_<user>, is empty
    # at every start of a service with PrivateTmp=yes. The environment or [environment] may name others.
    cache = cfg.paths.state_dir / COMPILE_CACHE
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    if "nnUNet_n_proc_DA" not in env and (cpus := slurm_cpus(env)) is not None:
        # nnU-Net would start 12 workers whatever the allocation; with fewer CPUs they die (nnU-Net #2863)
        env["nnUNet_n_proc_DA"] = str(cpus)
    env.update(overrides or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    # a segfault then prints "Fatal Python error: Segmentation fault": the final error classify needs
    env.setdefault("PYTHONFAULTHANDLER", "1")  # so progress lines reach us as they are printed
    return env


def slurm_cpus(env) -> int | None:
    """SLURM_CPUS_PER_TASK inside a SLURM job (the allocation's CPUs per task), else None."""
    try:
        n = int(env.get("SLURM_CPUS_PER_TASK", ""))
    except ValueError:
        return None
    return max(1, n) if env.get("SLURM_JOB_ID") else None


NNUNET_DEFAULT_N_PROC_DA = 12  # nnunetv2.utilities.default_n_proc_DA on an unknown host, capped at CPUs


def configured_workers(cfg: Config) -> int:
    """nnUNet_n_proc_DA the trainer will use: [environment] or the environment, else nnU-Net's default."""
    default = min(NNUNET_DEFAULT_N_PROC_DA, os.cpu_count() or 1)
    try:
        return max(1, int(build_env(cfg).get("nnUNet_n_proc_DA", default)))
    except ValueError:
        return default


def job_identity(cfg: Config) -> dict:
    """What makes a state.json belong to this job (a different one is moved aside, not reused)."""
    return {"dataset": dataset_name(cfg), "configuration": cfg.training.configuration, "fold": cfg.training.fold,
            "trainer": cfg.training.trainer, "plans": cfg.training.plans, "results": str(cfg.paths.results)}
