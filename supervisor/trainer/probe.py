"""What `cardiacseg-train check` asks the trainer's Python: run as a script, never imported by the daemon.

How it works: `check` runs `python probe.py TRAINER` in a subprocess with the trainer's environment
(job.build_env: nnUNet_* paths, nnUNet_extTrainer, CUDA_VISIBLE_DEVICES) and a timeout. It imports torch
and nnunetv2 and looks the trainer class up exactly as nnUNetv2_train does
(nnunetv2.utilities.find_objects.recursive_find_trainer_class_by_name: nnunetv2.training.nnUNetTrainer,
then every folder of nnUNet_extTrainer), with that function's progress prints silenced. The last stdout
line is `CARDIACSEG_PROBE <json>` with:
  torch, torch_cuda (torch.version.cuda: None for a CPU-only build), cuda_available, torch_error;
  trainer (module.class when found, else None), trainer_error, searched (the folders looked in),
  known (every class name defined in those folders, for close-match suggestions).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

from supervisor.integrations.probes import MARKER
from supervisor.integrations.trainer_class import class_names


def probe(trainer: str) -> dict:
    out: dict = {}
    try:
        import torch
    except Exception as e:  # a broken install is a finding, not a crash of the probe
        out["torch_error"] = f"{type(e).__name__}: {e}"
    else:
        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cuda_available=bool(torch.cuda.is_available()))
    try:
        import nnunetv2
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    except Exception as e:
        out["trainer_error"] = f"cannot import nnunetv2: {type(e).__name__}: {e}"
        return out
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    out["searched"] = [os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), *ext]
    try:
        # nnU-Net prints its search progress to stdout, where only our one result line may go
        with contextlib.redirect_stdout(io.StringIO()):
            cls = recursive_find_trainer_class_by_name(trainer)
        out["trainer"] = f"{cls.__module__}.{cls.__qualname__}"
    except (RuntimeError, AssertionError) as e:
        out["trainer"] = None
        out["trainer_error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception as e:  # a trainer module that fails to import stops nnU-Net's lookup the same way
        out["trainer"] = None
        out["trainer_error"] = f"importing the trainer modules failed: {type(e).__name__}: {e}"
    out["known"] = class_names([p for p in out["searched"] if os.path.isdir(p)])
    return out


if __name__ == "__main__":
    print(MARKER + json.dumps(probe(sys.argv[1])), flush=True)
