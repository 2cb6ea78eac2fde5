"""Tiny nnU-Net trainers for the CPU demo and end-to-end tests (loaded through nnUNet_extTrainer).

nnUNetTrainerDemo: a few iterations per epoch and CARDIACSEG_DEMO_EPOCHS epochs (default 8). Its
checkpointing is stock nnU-Net's (checkpoint_latest every 50 epochs): the supervisor's default launcher
(cardiacseg-train-nnunet) is what makes it save every epoch.
CARDIACSEG_DEMO_CRASH_AT=k raises a RuntimeError at the start of epoch k, once per results folder
(a marker file remembers it): the demo's injected crash.

nnUNetTrainerDemoDecline: from epoch 2 on, its validation finds no true positives, so the pseudo Dice
drops to 0 and the EMA never improves again: a plateau/decline as in long real runs, where stock nnU-Net's
checkpoint_best lags behind (the benchmark's lost-work comparison).

nnUNetTrainerDemoOOM: raises torch.OutOfMemoryError from its train step while the plan's batch size
is above 1, like a real CUDA OOM (for the OOM step-down tests).
"""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerDemo(nnUNetTrainer):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = int(os.environ.get("CARDIACSEG_DEMO_ITERS", 6))
        self.num_val_iterations_per_epoch = 2
        self.num_epochs = int(os.environ.get("CARDIACSEG_DEMO_EPOCHS", 8))

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
