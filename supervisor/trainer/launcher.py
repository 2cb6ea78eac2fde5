"""`cardiacseg-train-nnunet`: nnUNetv2_train with no-lost-work checkpointing. The default training command.

It is nnunetv2's own `run_training_entry` (same arguments, same trainer classes, same results folders:
`--c` works across it and plain nnUNetv2_train in both directions), with three changes patched onto the
nnUNetTrainer base class, so they hold for every trainer derived from it:
1. checkpoint_latest.pth every CARDIACSEG_CHECKPOINT_EVERY epochs (default 1; nnU-Net: every 50), set at
   on_train_start so a subclass's own __init__ cannot undo it;
2. every checkpoint write (latest, best, final) is atomic: torch.save to a temp file in the same folder,
   flush + fsync, rename over the target, fsync the folder. A kill at any moment leaves the previous
   file intact;
3. SIGINT/SIGTERM never interrupt a checkpoint write: the handler raises KeyboardInterrupt at once
   (stopping within seconds, losing at most the partial epoch; nnU-Net saves nothing on SIGINT), except
   while a checkpoint is being written, when the interrupt is raised right after the write completes.
   An interrupt at an epoch boundary thus stops after that epoch's checkpoint.
Under `-num_gpus N` the DDP ranks are started by torch's spawn in fresh interpreters: `run_ddp` is
replaced by a picklable wrapper that applies the same patches in each rank.
"""
from __future__ import annotations

import os
import signal
import sys

_state = {"saving": 0, "pending": None}


def _handler(signum, _frame):
    if _state["saving"]:
        _state["pending"] = signum
        return
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to filename atomically; the previous file survives any interruption."""
    import torch

    folder = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(folder, f".{os.path.basename(filename)}.tmp-{os.getpid()}")
    _state["saving"] += 1
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, filename)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _state["saving"] -= 1
    if not _state["saving"] and _state["pending"] is not None:
        signum, _state["pending"] = _state["pending"], None
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name} after the checkpoint write")


def apply_patches() -> None:
    import torch
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as mod

    cls = mod.nnUNetTrainer
    if getattr(cls, "_cardiacseg_patched", False):
        return
    every = max(1, int(os.environ.get("CARDIACSEG_CHECKPOINT_EVERY", "1")))
    orig_start = cls.on_train_start

    def on_train_start(self):
        orig_start(self)
        self.save_every = every

    class _AtomicTorch:
        """Stands in for the `torch` module inside nnUNetTrainer.py: torch.save becomes atomic."""

        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def save(obj, f, *a, **kw):
            if isinstance(f, (str, os.PathLike)) and not a and not kw:
                return atomic_torch_save(obj, os.fspath(f))
            return torch.save(obj, f, *a, **kw)

    mod.torch = _AtomicTorch()  # the trainer module's global `torch`, used by save_checkpoint
    cls.on_train_start = on_train_start
    cls._cardiacseg_patched = True
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _handler)


def run_ddp(*args, **kwargs):
    """Picklable stand-in for nnunetv2's run_ddp: patch the rank, then run it."""
    from nnunetv2.run import run_training as rt

    apply_patches()
    return _ORIG_RUN_DDP[0](*args, **kwargs) if _ORIG_RUN_DDP else rt.run_ddp(*args, **kwargs)


_ORIG_RUN_DDP: list = []


def main() -> None:
    apply_patches()
    from nnunetv2.run import run_training as rt

    if rt.run_ddp is not run_ddp:
        _ORIG_RUN_DDP.append(rt.run_ddp)
        rt.run_ddp = run_ddp
    rt.run_training_entry()


if __name__ == "__main__":
    sys.argv[0] = "cardiacseg-train-nnunet"
    main()
