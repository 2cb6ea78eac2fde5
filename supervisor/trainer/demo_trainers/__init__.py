"""nnU-Net trainer classes for the demo and the end-to-end tests, found via nnUNet_extTrainer.

Imported by nnU-Net inside the training process only; the supervisor never imports this package's
modules (they import torch).
"""
from pathlib import Path

DIR = Path(__file__).parent
