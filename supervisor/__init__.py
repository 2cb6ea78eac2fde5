"""cardiacseg-train: a watchdog daemon that runs nnU-Net v2 training unattended.

Modules, each with one job: config (config.toml), job (argv, folders, checkpoints), logparse (training
log -> epochs + EMA), classify (why an attempt ended), policy (pure decisions), proc (process groups),
store (atomic files, lock), daemon (the loop), status, check, demo, cli.
"""
__version__ = "0.1.0"
