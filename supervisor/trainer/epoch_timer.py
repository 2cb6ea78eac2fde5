"""Where each epoch's time goes, measured inside the trainer; one JSON line per epoch for the supervisor.

How it works: `patch(cls, path)` wraps nnUNetTrainer's epoch hooks (on the base class, so every derived
trainer that calls super() is measured). nnU-Net's loop is `train_step(next(self.dataloader_train))`, so
on_train_start replaces both data loaders with `TimedLoader`, whose `__next__` times the call to the real
loader: that is the time the loop WAITED for a batch (with nnUNet_n_proc_DA=0 the whole augmentation runs
there, which is right: the loop waits for it). The train phase runs from on_train_epoch_start to
on_train_epoch_end; the train steps are that phase minus the wait. Validation runs from
on_validation_epoch_start to on_validation_epoch_end (its own wait recorded apart); the epoch from
on_epoch_start to the end of on_epoch_end (nnU-Net's logging, checkpoints and progress.png: `end_s`).
On CUDA, kernels run asynchronously: `torch.cuda.synchronize` before each wait starts and at the end of
each phase charges queued GPU work to the step that queued it, never to the data wait (after nnU-Net's
own `loss.cpu()` the synchronize finds nothing to wait for). on_train_end unwraps the loaders before
nnU-Net's own shuts them down (it checks their class).
The line (`to_line`) is appended with one write(2) on an O_APPEND descriptor, opened per epoch: a reader
never sees half a line from a finished write, and a crash loses at most the epoch in progress. A failed
write is reported once on stderr and never stops training. Only rank 0 writes.
"""
from __future__ import annotations

import json
import os
import sys
import time

PROFILE_ENV = "CARDIACSEG_PROFILE_FILE"
FORMAT = 1


class TimedLoader:
    """A data loader whose `next()` adds the time it blocked to `timer.wait[phase]`."""

    def __init__(self, inner, timer: "EpochTimer", phase: str):
        self.inner, self._timer, self._phase = inner, timer, phase

    def __iter__(self):
        return self

    def __next__(self):
        t = self._timer
        t.sync()  # GPU work still queued belongs to the previous step, not to this wait
        t0 = t.clock()
        try:
            return next(self.inner)
        finally:
            t.wait[self._phase] += t.clock() - t0

    def __getattr__(self, name):  # _finish, generator, ... of the real augmenter
        return getattr(self.inner, name)


class EpochTimer:
    """The figures of the epoch in progress for one trainer; `to_line()` once the epoch ended."""

    def __init__(self, path: str, clock=time.perf_counter, sync=None):
        self.path, self.clock = path, clock
        self.sync = sync or (lambda: None)
        self.wait = {"train": 0.0, "val": 0.0}
        self.marks: dict[str, float] = {}
        self.failed = False
        self.facts: dict | None = None

    def mark(self, name: str, synchronize: bool = False) -> None:
        if synchronize:
            self.sync()
        if name == "epoch_start":
            self.wait = {"train": 0.0, "val": 0.0}
            self.marks = {}
        self.marks[name] = self.clock()

    def span(self, a: str, b: str) -> float | None:
        m = self.marks
        return round(m[b] - m[a], 6) if a in m and b in m else None

    def figures(self) -> dict:
        train_s = self.span("train_start", "train_end")
        wait = round(self.wait["train"], 6)
        return {"data_wait_s": wait, "train_s": train_s,
                "step_s": None if train_s is None else round(max(0.0, train_s - wait), 6),
                "val_s": self.span("val_start", "val_end"), "val_data_wait_s": round(self.wait["val"], 6),
                "end_s": self.span("end_start", "epoch_end"), "epoch_s": self.span("epoch_start", "epoch_end")}

    def write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            if not self.failed:  # once: a full disk must not flood the attempt log
                print(f"cardiacseg-train-nnunet: epoch profile not written to {self.path}: {e}",
                      file=sys.stderr, flush=True)
            self.failed = True


def trainer_facts(trainer) -> dict:
    """What the supervisor cannot see from outside: the device, torch's CUDA, the loader's workers."""
    import torch

    loader = getattr(trainer, "dataloader_train", None)
    loader = getattr(loader, "inner", loader)
    procs = getattr(loader, "_processes", None) or []
    return {"device": str(getattr(trainer, "device", "unknown")),
            "torch_cuda_available": bool(torch.cuda.is_available()), "torch_cuda": torch.version.cuda,
            "batch_size": getattr(trainer, "batch_size", None),
            "iterations": getattr(trainer, "num_iterations_per_epoch", None),
            "val_iterations": getattr(trainer, "num_val_iterations_per_epoch", None),
            # the augmenter's own count: nnUNet_n_proc_DA as nnU-Net resolved it (0: in the loop itself)
            "n_proc_da": int(getattr(loader, "num_processes", 0) or 0),
            "worker_pids": [p.pid for p in procs if getattr(p, "pid", None)]}


def _syncer(trainer):
    import torch

    dev = getattr(trainer, "device", None)
    if getattr(dev, "type", None) == "cuda" and torch.cuda.is_available():
        return lambda: torch.cuda.synchronize(dev)
    return None


def patch(cls, path: str | None) -> None:
    """Wrap cls's epoch hooks to time them and append a line per epoch to `path`; None: do nothing."""
    if not path or getattr(cls, "_cardiacseg_timed", False):
        return
    orig = {n: getattr(cls, n) for n in ("on_train_start", "on_epoch_start", "on_train_epoch_start",
                                         "on_train_epoch_end", "on_validation_epoch_start",
                                         "on_validation_epoch_end", "on_epoch_end", "on_train_end")}

    def timer(self) -> EpochTimer:
        t = self.__dict__.get("_cardiacseg_timer")
        if t is None:
            t = self._cardiacseg_timer = EpochTimer(path, sync=_syncer(self))
        return t

    def on_train_start(self):
        orig["on_train_start"](self)  # creates the data loaders
        t = timer(self)
        for attr, phase in (("dataloader_train", "train"), ("dataloader_val", "val")):
            dl = getattr(self, attr, None)
            if dl is not None and not isinstance(dl, TimedLoader):
                setattr(self, attr, TimedLoader(dl, t, phase))

    def on_epoch_start(self):
        timer(self).mark("epoch_start")
        orig["on_epoch_start"](self)

    def on_train_epoch_start(self):
        orig["on_train_epoch_start"](self)
        timer(self).mark("train_start")

    def on_train_epoch_end(self, outputs):
        timer(self).mark("train_end", synchronize=True)
        return orig["on_train_epoch_end"](self, outputs)

    def on_validation_epoch_start(self):
        orig["on_validation_epoch_start"](self)
        timer(self).mark("val_start")

    def on_validation_epoch_end(self, outputs):
        timer(self).mark("val_end", synchronize=True)
        return orig["on_validation_epoch_end"](self, outputs)

    def on_epoch_end(self):
        t = timer(self)
        epoch = self.current_epoch  # on_epoch_end advances it
        t.mark("end_start")
        orig["on_epoch_end"](self)
        t.mark("epoch_end")
        if getattr(self, "local_rank", 0) == 0:
            if t.facts is None or not t.facts["worker_pids"]:  # workers start lazily: look until seen
                t.facts = trainer_facts(self)
            t.write({"v": FORMAT, "epoch": epoch, "pid": os.getpid(), "wall": round(time.time(), 3),
                     **t.figures(), **t.facts})

    def on_train_end(self):
        for attr in ("dataloader_train", "dataloader_val"):
            dl = getattr(self, attr, None)
            if isinstance(dl, TimedLoader):  # nnU-Net shuts down its augmenters by their class
                setattr(self, attr, dl.inner)
        orig["on_train_end"](self)

    for fn in (on_train_start, on_epoch_start, on_train_epoch_start, on_train_epoch_end,
               on_validation_epoch_start, on_validation_epoch_end, on_epoch_end, on_train_end):
        setattr(cls, fn.__name__, fn)
    cls._cardiacseg_timed = True
