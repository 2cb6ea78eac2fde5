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
A requested stop ends with ONE line on stderr instead of nnU-Net's KeyboardInterrupt traceback
(`cardiacseg-train-nnunet: stopped by SIGINT after epoch 4; --c resumes from checkpoint_latest.pth`: the
file nnU-Net's `--c` loads, final, else latest, else best, not the last one written, which after a new
best is checkpoint_best.pth); the
exit handlers then run (atexit: multiprocessing ends the workers), the output is flushed, and the process
ends by SIGINT with its default action, as Python ends for an uncaught KeyboardInterrupt: returncode -2
for the supervisor, exit status 130 in a shell. It does not go through the interpreter's finalisation:
C++ threads of torch's or a data library's still running there made it abort now and then ("terminate
called without an active exception", returncode -6, a page of extension module names). The augmentation workers (forked children of the
trainer, in its process group, so they receive the same SIGINT) ignore SIGINT: the trainer alone decides,
and ends them when it exits (multiprocessing terminates its daemonic children); their own
KeyboardInterrupt tracebacks, interleaved with the trainer's, are gone with it. SIGTERM still ends a
worker, silently.
Under `-num_gpus N` the DDP ranks are started by torch's spawn in fresh interpreters: `run_ddp` is
replaced by a picklable wrapper that applies the same patches in each rank.
4. with CARDIACSEG_PROFILE_FILE set (the supervisor sets it per attempt), one JSON line per epoch is
   appended to that file: where the epoch's time went (supervisor/trainer/epoch_timer.py: waiting for the
   data loader's next batch, the train steps, validation, the end of the epoch with its checkpoints).
   Unset, nothing is measured, wrapped or written. nnU-Net's own log is never changed.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from supervisor.config.job import CHECKPOINT_ORDER, checkpoint_temp_name
from supervisor.trainer import epoch_timer

_state = {"saving": 0, "pending": None, "main_pid": os.getpid(), "signal": None, "epoch": None,
          "folder": None}  # folder: where this run wrote a checkpoint


def _handler(signum, _frame):
    if os.getpid() != _state["main_pid"]:  # a forked augmentation worker inherited this handler
        if signum == signal.SIGTERM:
            os._exit(128 + signum)  # multiprocessing's terminate() at the trainer's exit: go quietly
        return  # SIGINT: the trainer stops; it ends its workers itself
    _state["signal"] = signum
    if _state["saving"]:
        _state["pending"] = signum
        return
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def stop_message(signum: int | None, epoch: int | None, folder: str | None) -> str:
    """The one line a requested stop ends with: what `--c` will load from the fold `folder` this run wrote
    checkpoints to (nnU-Net's order: final, latest, best)."""
    by = signal.Signals(signum).name if signum else "KeyboardInterrupt"
    when = f"after epoch {epoch}" if epoch is not None else "before the first epoch of this run finished"
    ck = next((n for n in CHECKPOINT_ORDER if folder and os.path.isfile(os.path.join(folder, n))), None)
    return f"cardiacseg-train-nnunet: stopped by {by} {when}; " + (
        f"--c resumes from {ck}" if ck else "no checkpoint written by this run")


def quiet_producer(*args, **kwargs):
    """batchgenerators' augmentation worker, with SIGINT ignored (also where workers are spawned)."""
    from batchgenerators.dataloading import nondet_multi_threaded_augmenter as nd

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _ORIG_PRODUCER[0](*args, **kwargs) if _ORIG_PRODUCER else nd.producer(*args, **kwargs)


_ORIG_PRODUCER: list = []


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to filename atomically; the previous file survives any interruption."""
    import torch

    folder = os.path.dirname(os.path.abspath(filename))
    tmp = os.path.join(folder, checkpoint_temp_name(os.path.basename(filename), os.getpid()))
    _state["saving"] += 1
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, filename)
        _state["folder"] = folder
        if isinstance(obj, dict) and isinstance(obj.get("current_epoch"), int):
            # nnU-Net stores the NEXT epoch; an interrupt right after this write precedes on_epoch_end's end
            _state["epoch"] = max(_state["epoch"] if _state["epoch"] is not None else -1, obj["current_epoch"] - 1)
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
    orig_epoch_end = cls.on_epoch_end

    def on_train_start(self):
        orig_start(self)
        self.save_every = every

    def on_epoch_end(self):
        orig_epoch_end(self)  # logs, saves, then advances current_epoch
        _state["epoch"] = self.current_epoch - 1

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
    cls.on_epoch_end = on_epoch_end
    epoch_timer.patch(cls, os.environ.get(epoch_timer.PROFILE_ENV))  # after ours: it wraps them
    try:
        from batchgenerators.dataloading import nondet_multi_threaded_augmenter as nd
    except ImportError:
        pass
    else:
        if nd.producer is not quiet_producer:
            _ORIG_PRODUCER.append(nd.producer)
            nd.producer = quiet_producer
    quiet_spawned_children()
    cls._cardiacseg_patched = True
    install_signal_handlers()


def quiet_spawned_children() -> None:
    """Children started by multiprocessing's spawn (nnU-Net's final validation exports its predictions in
    a spawn Pool) get SIGINT ignored: Python keeps an inherited SIG_IGN instead of installing its
    KeyboardInterrupt handler, so a stop sent to the trainer's group makes no traceback in each of them;
    the trainer ends them itself (Pool's finaliser: SIGTERM). Around the launch the parent blocks SIGINT
    too, so a stop arriving then is delivered to it right after, never lost."""
    try:
        from multiprocessing import popen_spawn_posix as ps
    except ImportError:
        return
    orig = ps.Popen._launch
    if getattr(orig, "_cardiacseg", False):
        return

    def _launch(self, process_obj):
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return orig(self, process_obj)
        finally:
            signal.signal(signal.SIGINT, old)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    _launch._cardiacseg = True
    ps.Popen._launch = _launch


def install_signal_handlers() -> None:
    """SIGINT/SIGTERM -> _handler, in this process (its forked workers inherit it and stay quiet)."""
    _state["main_pid"] = os.getpid()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _handler)


def run_ddp(*args, **kwargs):
    """Picklable stand-in for nnunetv2's run_ddp: patch the rank, then run it."""
    from nnunetv2.run import run_training as rt

    apply_patches()
    return _ORIG_RUN_DDP[0](*args, **kwargs) if _ORIG_RUN_DDP else rt.run_ddp(*args, **kwargs)


_ORIG_RUN_DDP: list = []


def main() -> None:
    # everything inside run_until_stopped: a stop while torch and nnU-Net are still being imported (seconds)
    # ends with the same one line as a stop in epoch 500
    install_signal_handlers()
    run_until_stopped(_start_training)


def _start_training() -> None:
    apply_patches()
    from nnunetv2.run import run_training as rt

    if rt.run_ddp is not run_ddp:
        _ORIG_RUN_DDP.append(rt.run_ddp)
        rt.run_ddp = run_ddp
    rt.run_training_entry()


def _silent_keyboard_interrupt(etype, value, tb):
    if not issubclass(etype, KeyboardInterrupt):
        sys.__excepthook__(etype, value, tb)


def run_until_stopped(fn) -> None:
    """fn(); a requested stop (KeyboardInterrupt) ends with one line instead of a traceback, by SIGINT."""
    try:
        fn()
    except KeyboardInterrupt:
        # the data loader's result threads die of the stop (their workers are gone: ConnectionResetError,
        # "background workers are no longer alive"); that is not news after a requested stop
        threading.excepthook = lambda _args: None
        print(stop_message(_state["signal"], _state["epoch"], _state["folder"]), file=sys.stderr, flush=True)
        sys.excepthook = _silent_keyboard_interrupt
        if os.getpid() != _state["main_pid"]:
            raise  # a process this one forked: its own exit, as before
        die_by_sigint()


def die_by_sigint() -> None:
    """atexit's handlers, flushed output, then SIGINT's default action: -2, like an uncaught KeyboardInterrupt,
    without the interpreter's finalisation (see the module docstring)."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        os.kill(os.getpid(), signal.SIGINT)
        os._exit(128 + signal.SIGINT)  # not reached: the signal ends the process on the way out of kill()


if __name__ == "__main__":
    sys.argv[0] = "cardiacseg-train-nnunet"
    main()
