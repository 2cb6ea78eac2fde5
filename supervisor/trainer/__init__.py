"""Code that runs INSIDE the trainer process, never in the supervisor daemon.

- launcher.py: `cardiacseg-train-nnunet`, nnUNetv2_train with per-epoch atomic checkpoints and SIGINT
  handled at safe points (imports torch and nnunetv2).
- demo_trainers/: tiny nnUNetTrainer subclasses for the demo, tests and benchmarks, found by nnU-Net
  through nnUNet_extTrainer.
Nothing in the daemon's modules imports from here.
"""
