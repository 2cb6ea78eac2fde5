"""Load each fold's resume checkpoint exactly as `nnUNetv2_train --c` will: run as a script, never imported
by the supervisor (which never imports torch).

How it works: `python resume_probe.py JSON` with JSON = {"trainer": NAME, "checkpoints": [[fold, path],
...]} in the trainer's environment. It reads the weights_only setting from the installed nnunetv2's own
nnUNetTrainer.load_checkpoint source (2.8.1 passes weights_only=False; releases before 2.6 pass nothing,
so torch >= 2.6's default True applies and their checkpoints fail to load), then torch.load()s each file
with map_location="cpu" and that setting, and looks the trainer class up with nnunetv2's
recursive_find_trainer_class_by_name (nnunetv2's trainers, then nnUNet_extTrainer). The last stdout
line is `CARDIACSEG_PROBE <json>` (integrations/probes.py reads it): versions, weights_only, trainer / trainer_error, and per checkpoint
fold, path, error (None when it loaded), epoch, ema, trainer_name.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import platform
import re
import sys

from supervisor.integrations.probes import MARKER



def _weights_only(trainer_cls) -> bool | None:
    """The weights_only nnunetv2's load_checkpoint passes to torch.load; None: it passes none."""
    try:
        src = inspect.getsource(trainer_cls.load_checkpoint)
    except (OSError, TypeError):
        return None
    m = re.search(r"torch\.load\([^)]*weights_only\s*=\s*(True|False)", src)
    return None if m is None else m.group(1) == "True"


def probe(req: dict) -> dict:
    out: dict = {"versions": {"python": platform.python_version()}}
    try:
        import numpy
        import torch
        import nnunetv2
        from importlib import metadata
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except Exception as e:  # a broken install is a finding, not a crash of the probe
        out["import_error"] = f"{type(e).__name__}: {e}"
        return out
    out["versions"].update(torch=torch.__version__, numpy=numpy.__version__,
                           nnunetv2=getattr(nnunetv2, "__version__", None) or metadata.version("nnunetv2"))
    out["weights_only"] = wo = _weights_only(nnUNetTrainer)
    kwargs = {} if wo is None else {"weights_only": wo}
    out["checkpoints"] = []
    for fold, path in req.get("checkpoints", []):
        r = {"fold": fold, "path": path, "error": None}
        try:
            ck = torch.load(path, map_location="cpu", **kwargs)
            emas = ck.get("logging", {}).get("ema_fg_dice") or []
            r.update(epoch=int(ck.get("current_epoch")), ema=float(emas[-1]) if emas else None,
                     trainer_name=ck.get("trainer_name"))
        except Exception as e:  # whatever torch.load raises is what --c would die of
            r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out["checkpoints"].append(r)
    name = req.get("trainer")
    if name:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its search to stdout
                cls = recursive_find_trainer_class_by_name(name)
            out["trainer"] = f"{cls.__module__}.{cls.__qualname__}"
        except Exception as e:
            out["trainer"] = None
            out["trainer_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return out


if __name__ == "__main__":
    print(MARKER + json.dumps(probe(json.loads(sys.argv[1]))), flush=True)
