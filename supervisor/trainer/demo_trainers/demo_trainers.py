"""Tiny nnU-Net trainers for the CPU demo and end-to-end tests (loaded through nnUNet_extTrainer).

nnUNetTrainerDemo: a few iterations per epoch and CARDIACSEG_DEMO_EPOCHS epochs (default 8). Seeded
(CARDIACSEG_DEMO_SEED, default 0): python's random, numpy and torch in the trainer, and each augmentation
worker (nnU-Net starts them with seeds=None, i.e. from the OS), with torch's deterministic algorithms
where they exist (warn_only). Each attempt seeds afresh, so a run with the same crash repeats the same way
on one machine and software stack; across CPUs, thread counts or library versions the Dice values may
still differ in the last digits, so the epoch at which an EMA crosses a target is not promised. Its
checkpointing is stock nnU-Net's (checkpoint_latest every 50 epochs): the supervisor's default launcher
(cardiacseg-train-nnunet) is what makes it save every epoch.
CARDIACSEG_DEMO_CRASH_AT=k raises a RuntimeError at the start of epoch k, once per results folder
(a marker file remembers it): the demo's injected crash.

nnUNetTrainerDemoDecline: from epoch 2 on, its validation finds no true positives, so the pseudo Dice
drops to 0 and the EMA never improves again: a plateau/decline as in long real runs, where stock nnU-Net's
checkpoint_best lags behind (the benchmark's lost-work comparison).

nnUNetTrainerDemoSlowData: the demo trainer with a slow data loader: every training sample takes its
augmentation worker CARDIACSEG_DEMO_SLOW_DATA_S seconds (default 5) more, so the training loop waits for
its batches (the `data_loading` bottleneck of `status`). The worker sleeps rather than burning CPU: on a
small shared machine a burning worker slows the CPU train step as much as itself, and the wait would
depend on the machine's load. Its augmenter keeps one batch ready instead of nnU-Net's six, so a short
epoch cannot live off a stock made at start-up.

nnUNetTrainerDemoCompile: compiles its network with torch.compile whenever nnUNet_compile allows it (stock
nnU-Net never compiles on a CPU), so a broken compiler tool chain (CXX=/nonexistent/g++) fails as it does on a
GPU machine without a working C++ compiler: torch._inductor.exc.InductorError in the first train step.

nnUNetTrainerDemoWorkerDeath: while nnUNet_n_proc_DA is above 1, an augmentation worker is killed with
SIGKILL at its CARDIACSEG_DEMO_WORKER_DIES_AFTER-th batch (default 3), as the kernel's OOM killer takes one
when host RAM or /dev/shm runs out: nnU-Net's main process then ends with "One or more background workers
are no longer alive".

nnUNetTrainerDemoOOM: raises torch.OutOfMemoryError from its train step while the plan's batch size
is above 1, like a real CUDA OOM (for the OOM step-down tests).
"""
import os
import random
import signal
import time

import numpy as np
import torch

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class nnUNetTrainerDemo(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("CARDIACSEG_DEMO_ITERS", 6))
        self.num_val_iterations_per_epoch = 2
        self.num_epochs = int(os.environ.get("CARDIACSEG_DEMO_EPOCHS", 8))
        self.demo_seed = int(os.environ.get("CARDIACSEG_DEMO_SEED", 0))
        seed_everything(self.demo_seed)

    num_cached: int | None = None  # batches the augmenter keeps ready (None: nnU-Net's choice, >= 6)

    def get_dataloaders(self):
        """nnU-Net's dataloaders, with its augmentation workers seeded (it passes seeds=None)."""
        orig, seed, cached = trainer_module.NonDetMultiThreadedAugmenter, self.demo_seed, self.num_cached

        def seeded(*args, num_processes=1, seeds=None, **kwargs):
            if cached is not None:
                kwargs["num_cached"] = cached
            return orig(*args, num_processes=num_processes, seeds=[seed + i for i in range(num_processes)], **kwargs)

        trainer_module.NonDetMultiThreadedAugmenter = seeded
        try:
            return super().get_dataloaders()
        finally:
            trainer_module.NonDetMultiThreadedAugmenter = orig

    def on_epoch_start(self):
        crash_at = os.environ.get("CARDIACSEG_DEMO_CRASH_AT")
        if crash_at is not None and self.current_epoch == int(crash_at):
            marker = os.path.join(self.output_folder, ".demo_crash_done")
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError(f"demo: simulated crash at the start of epoch {self.current_epoch}")
        super().on_epoch_start()


class nnUNetTrainerDemoOOM(nnUNetTrainerDemo):
    def train_step(self, batch: dict) -> dict:
        if self.batch_size > 1:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB (simulated at batch size {self.batch_size})")
        return super().train_step(batch)


class nnUNetTrainerDemoDecline(nnUNetTrainerDemo):
    def on_validation_epoch_end(self, val_outputs):
        if self.current_epoch >= 2:
            for o in val_outputs:
                o["tp_hard"] = o["tp_hard"] * 0
        return super().on_validation_epoch_end(val_outputs)


class SlowTransforms:
    """nnU-Net's training transforms, `seconds` later (in the augmentation worker)."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds

    def __call__(self, **data):
        time.sleep(self.seconds)
        return self.inner(**data)


class nnUNetTrainerDemoSlowData(nnUNetTrainerDemo):
    num_cached = 1  # no stock of batches made while the trainer starts or validates: the wait shows at once

    @staticmethod
    def get_training_transforms(*args, **kwargs):
        inner = nnUNetTrainerDemo.get_training_transforms(*args, **kwargs)
        return SlowTransforms(inner, float(os.environ.get("CARDIACSEG_DEMO_SLOW_DATA_S", "5")))


class nnUNetTrainerDemoCompile(nnUNetTrainerDemo):
    def _do_i_compile(self):
        return os.environ.get("nnUNet_compile", "true").lower() in ("true", "1", "t")


class DyingTransforms(SlowTransforms):
    """nnU-Net's training transforms; the worker process kills itself with SIGKILL at its `after`-th batch."""

    def __init__(self, inner, after: int):
        super().__init__(inner, 0.0)
        self.after, self.calls = after, 0

    def __call__(self, **data):
        self.calls += 1
        if self.calls >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(**data)


class nnUNetTrainerDemoWorkerDeath(nnUNetTrainerDemo):
    @staticmethod
    def get_training_transforms(*args, **kwargs):
        inner = nnUNetTrainerDemo.get_training_transforms(*args, **kwargs)
        if int(os.environ.get("nnUNet_n_proc_DA", "1")) <= 1:
            return inner
        return DyingTransforms(inner, int(os.environ.get("CARDIACSEG_DEMO_WORKER_DIES_AFTER", "3")))
