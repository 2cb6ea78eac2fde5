#!/usr/bin/env python3
"""A stand-in for nnUNetv2_train for fast fault-injection tests.

It behaves like nnunetv2 2.8.1's trainer where the supervisor can see it:
- the same arguments (DATASET CONFIGURATION FOLD -tr -p -device [-num_gpus] [--c]) and environment
  (nnUNet_preprocessed, nnUNet_results); a missing dataset/plans or an unknown trainer fails with
  nnU-Net's own messages;
- the same results folder, a NEW training_log_Y_M_D_H_M_S.txt per start, the same per-epoch lines in the
  same order (Epoch, learning rate, losses, Pseudo dice in numpy-2 repr, Epoch time, Yayy!);
- real torch checkpoints with nnU-Net's keys; --c loads final, else latest, else best, and resumes at
  the checkpoint's current_epoch with its logging (so the EMA continues as nnU-Net's does);
  checkpoint_latest every FAKE_SAVE_EVERY epochs (nnU-Net: 50), best on EMA improvement, final at the
  end (then latest is deleted), "Training done.", then "Mean Validation Dice:";
- an augmentation worker child process in the same process group (like nnUNet_n_proc_DA workers);
- SIGINT: default Python behaviour (KeyboardInterrupt, dies by SIGINT, saves nothing).

Faults on cue, from the environment (each fires once per results folder, tracked in a marker file):
  FAKE_FAULT="EPOCH:KIND[,EPOCH:KIND...]" with KIND one of
    crash   - RuntimeError traceback, exit 1
    oom     - torch.OutOfMemoryError traceback, exit 1
    oomabrt - the same traceback, then SIGABRT (nnU-Net sometimes dies so)
    hostoom - "DefaultCPUAllocator: can't allocate memory" traceback, exit 1 (host RAM)
    sigkill - kill itself with SIGKILL (what the kernel OOM killer does)
    hang    - stop printing and sleep forever mid-epoch
    nan     - report nan losses and dice from then on
    daemon  - start a daemon that double-forks, calls setsid and execs `sleep` with an EMPTY environment
              (no group, no marker finds it; its pid in <fold>/daemon.pid), then train on
    compile - real nnU-Net's torch.compile failure (no C++ compiler), exit 1: EVERY time the epoch is reached
              while nnUNet_compile is on (unset counts as on, as in nnU-Net 2.4+)
    workers - real nnU-Net's "One or more background workers are no longer alive" and nothing else, exit 1:
              EVERY time the epoch is reached while nnUNet_n_proc_DA is above 1 (unset: nnU-Net's 12)
    enospc  - after the epoch's last log line, die writing checkpoint_best.pth with
              "OSError: [Errno 28] No space left on device" (a half-written file is left behind)
  FAKE_VAL_HANG=1      - the final validation hangs (idle, silent) the first time it runs
  FAKE_OOM_ABOVE_BS=N  - OOM in the first epoch whenever the plans' batch size is above N
  FAKE_CUDA_FRACTION=f - a REAL CUDA allocation of f x batch size x the GPU's memory at start-up
                         (a real torch.OutOfMemoryError when it does not fit; GPU checks only)
  FAKE_FAULT_FOLDS="1,3" - inject FAKE_FAULT only in these folds
  FAKE_EPOCHS (10), FAKE_EPOCH_S (0.2), FAKE_SAVE_EVERY (1), FAKE_DICE_STEP (0.05): pace and curve.
  FAKE_UNPACK_UNTIL=path - "unpacking dataset..." before epoch 0 (nnunetv2 before 2.6) lasts until path
                         exists (at most 300 s); FAKE_UNPACK_FOLDS="0" limits it to these folds
  FAKE_SAVE_S (0)      - seconds one checkpoint write takes (written in pieces, NOT atomically: stock
                         nnU-Net's torch.save; a SIGINT in the middle leaves a truncated file)
  --val                - nnU-Net's "only run the validation": needs checkpoint_final.pth, writes
                         validation/summary.json, prints "Mean Validation Dice:", exits 0
  FAKE_EVENTS=path     - append "<event> <unix time>" lines for the benchmarks: start, crash, sigint
"""
import io
import json
import os
import signal
import sys
import time
from datetime import datetime


def env_f(name, default):
    return float(os.environ.get(name, default))


def parse_args(argv):
    pos, opts, i = [], {"-tr": "nnUNetTrainer", "-p": "nnUNetPlans", "-device": "cuda",
                        "-num_gpus": "1"}, 0
    cont = False
    while i < len(argv):
        a = argv[i]
        if a == "--c":
            cont = True
        elif a == "--val":
            opts["--val"] = True
        elif a in opts:
            opts[a] = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            pass
        else:
            pos.append(a)
        i += 1
    if len(pos) != 3:
        print("usage: nnUNetv2_train [-h] dataset_name_or_id configuration fold ...", file=sys.stderr)
        print("nnUNetv2_train: error: the following arguments are required: fold", file=sys.stderr)
        sys.exit(2)
    return pos[0], pos[1], pos[2], opts, cont


class Logger:
    def __init__(self, path):
        self.path = path

    def __call__(self, *args):
        line = " ".join([f"{datetime.fromtimestamp(time.time())}:", *[str(a) for a in args]]) + " "
        with open(self.path, "a+") as f:
            f.write(line + "\n")
        print(line, flush=True)


def dice_for(epoch, nan):
    step = env_f("FAKE_DICE_STEP", 0.05)
    if nan:
        return [float("nan")] * 3
    return [min(0.97, 0.50 + step * epoch + 0.00123), min(0.93, 0.30 + step * epoch + 0.00456), 0.0]


def start_daemon(out):
    """The classic double fork: the middle process exits at once, the daemon is orphaned (reparented to
    the nearest subreaper: the supervisor), leaves the session and sheds the environment."""
    mid = os.fork()
    if mid == 0:
        os.setsid()
        if os.fork() == 0:
            with open(os.path.join(out, "daemon.pid"), "w") as fh:
                fh.write(str(os.getpid()))
            os.execve("/bin/sleep", ["sleep", "1000"], {})
        os._exit(0)
    os.waitpid(mid, 0)
    while not os.path.exists(os.path.join(out, "daemon.pid")):
        time.sleep(0.01)


def event(name):
    path = os.environ.get("FAKE_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {time.time():.6f} {os.getpid()}\n")


def on_sigint(signum, frame):
    event("sigint")
    raise KeyboardInterrupt


def main():
    event("start")
    if os.environ.get("FAKE_EVENTS"):
        signal.signal(signal.SIGINT, on_sigint)
    dataset, configuration, fold, opts, cont = parse_args(sys.argv[1:])
    trainer = opts["-tr"]
    if not trainer.startswith("nnUNetTrainer"):
        raise RuntimeError(f"Could not find requested nnunet trainer {trainer} in "
                           f"nnunetv2.training.nnUNetTrainer. If the trainer is located elsewhere, ...")
    pre = os.environ["nnUNet_preprocessed"]
    plans_file = os.path.join(pre, dataset, opts["-p"] + ".json")
    with open(plans_file) as f:  # FileNotFoundError with the plans path, as nnU-Net
        plans = json.load(f)
    conf = plans["configurations"].get(configuration)
    if conf is None:
        raise RuntimeError(f"Requested configuration {configuration} not found in plans. "
                           f"Available configurations: {list(plans['configurations'])}")
    bs = conf.get("batch_size")
    if bs is None and conf.get("inherits_from"):
        bs = plans["configurations"][conf["inherits_from"]].get("batch_size")

    import torch  # after the argument checks, like nnU-Net's slow start

    out = os.path.join(os.environ["nnUNet_results"], dataset, f"{trainer}__{opts['-p']}__{configuration}",
                       f"fold_{fold}")
    os.makedirs(out, exist_ok=True)
    t = datetime.now()
    log = Logger(os.path.join(out, f"training_log_{t.year}_{t.month}_{t.day}_{t.hour:02d}_{t.minute:02d}_{t.second:02d}.txt"))
    log(f"batch size: {bs}, n_proc_DA: {os.environ.get('nnUNet_n_proc_DA', 'default')}, "
        f"CUDA_VISIBLE_DEVICES: {os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}")

    def validate_and_exit():
        log(f"export processes (nnUNet_def_n_proc): {os.environ.get('nnUNet_def_n_proc', 'default')}")
        if os.environ.get("FAKE_VAL_HANG") and fire("val", "hang"):
            while True:  # nnU-Net's export pool deadlocked: nothing runs, nothing is printed
                time.sleep(1)
        os.makedirs(os.path.join(out, "validation"), exist_ok=True)
        with open(os.path.join(out, "validation", "summary.json"), "w") as fh:
            json.dump({"foreground_mean": {"Dice": 0.61}}, fh)
        log("Mean Validation Dice: ", 0.61)

    num_epochs = int(env_f("FAKE_EPOCHS", 10))
    epoch_s = env_f("FAKE_EPOCH_S", 0.2)
    save_every = int(env_f("FAKE_SAVE_EVERY", 1))
    faults = {}
    fault_folds = os.environ.get("FAKE_FAULT_FOLDS")  # faults only in these folds (queue tests)
    fault_spec = os.environ.get("FAKE_FAULT", "") if not fault_folds or fold in fault_folds.split(",") else ""
    for item in filter(None, fault_spec.split(",")):
        e, kind = item.split(":")
        faults[int(e)] = kind
    marker = os.path.join(out, ".fake_faults_fired")
    fired = set(open(marker).read().split()) if os.path.exists(marker) else set()

    def fire(e, kind):
        key = f"{e}:{kind}"
        if key in fired:
            return False
        with open(marker, "a") as f:
            f.write(key + "\n")
        return True

    logging = {"mean_fg_dice": [], "ema_fg_dice": [], "dice_per_class_or_region": [],
               "train_losses": [], "val_losses": [], "lrs": []}
    best_ema, start = None, 0
    if cont:
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"):
            p = os.path.join(out, name)
            if os.path.isfile(p):
                ck = torch.load(p, weights_only=False)
                logging = ck["logging"]
                best_ema = ck["_best_ema"]
                start = ck["current_epoch"]
                for k in logging:  # nnU-Net's logger keeps lists of exactly current_epoch entries
                    logging[k] = logging[k][:start]
                break
        else:
            print("WARNING: Cannot continue training because there seems to be no checkpoint available "
                  "to continue from. Starting a new training...")

    if opts.get("--val"):
        if not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            raise RuntimeError("Cannot run validation because the training is not finished yet!")
        log("Running the final validation only (--val)")
        validate_and_exit()
        return

    # One augmentation worker in our process group, like nnU-Net's background workers.
    worker = os.fork()
    if worker == 0:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        while True:
            time.sleep(1)

    oom_above = os.environ.get("FAKE_OOM_ABOVE_BS")
    frac = os.environ.get("FAKE_CUDA_FRACTION")
    if frac is not None:  # real GPU memory, sized by the batch size in the plans file
        total = torch.cuda.get_device_properties(0).total_memory
        hold = torch.empty(int(total * float(frac) * bs) // 4, dtype=torch.float32, device="cuda")
        log(f"holding {hold.numel() * 4 / 2**30:.1f} GiB on the GPU at batch size {bs}")

    def save(name, epoch, fail=False):
        ck = {"network_weights": {"w": torch.zeros(4)}, "optimizer_state": {}, "grad_scaler_state": None,
              "logging": logging, "_best_ema": best_ema, "current_epoch": epoch + 1,
              "init_args": {"batch_size": bs}, "trainer_name": trainer}
        save_s = env_f("FAKE_SAVE_S", 0)
        if not save_s and not fail:
            torch.save(ck, os.path.join(out, name))
            return
        buf = io.BytesIO()
        torch.save(ck, buf)
        data = buf.getvalue()
        with open(os.path.join(out, name), "wb") as fh:  # like torch.save to a path: in place, not atomic
            for i in range(10):
                fh.write(data[i * len(data) // 10:(i + 1) * len(data) // 10])
                fh.flush()
                if fail and i == 4:
                    raise OSError(28, "No space left on device")
                time.sleep(save_s / 10)


    def real_failure(fixture):
        """Write what real nnU-Net wrote to stderr when it died so (a fixture captured on this machine)."""
        time.sleep(epoch_s / 2)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", fixture)) as fh:
            sys.stderr.write(fh.read())
        sys.stderr.flush()
        return 1

    def oom_traceback():
        sys.stderr.write(
            "Traceback (most recent call last):\n"
            '  File "nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py", line 1245, in train_step\n'
            "    l.backward()\n"
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
            "capacity of 23.65 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process "
            "has 22.51 GiB memory in use.\n")
        sys.stderr.flush()

    until = os.environ.get("FAKE_UNPACK_UNTIL")
    if until and fold in os.environ.get("FAKE_UNPACK_FOLDS", fold).split(","):
        # nnunetv2 before 2.6's on_train_start: npz -> npy in the shared preprocessed folder, here until the
        # test says it is done (the file appears), bounded
        log("unpacking dataset...")
        deadline = time.monotonic() + 300
        while not os.path.exists(until) and time.monotonic() < deadline:
            time.sleep(0.05)
        log("unpacking done...")

    nan = enospc = False
    for epoch in range(start, num_epochs):
        t0 = time.time()
        log("")
        log(f"Epoch {epoch}")
        log(f"Current learning rate: {round(0.01 * (1 - epoch / num_epochs) ** 0.9, 5)}")
        kind = faults.get(epoch)
        if oom_above is not None and bs is not None and bs > int(oom_above):
            oom_traceback()
            sys.exit(1)
        if kind == "compile" and os.environ.get("nnUNet_compile", "t").lower() in ("true", "1", "t"):
            sys.exit(real_failure("real_nnunet_compile_no_cxx.txt"))  # every time compile is on, as in life
        if kind == "workers" and int(os.environ.get("nnUNet_n_proc_DA") or 12) > 1:
            sys.exit(real_failure("real_nnunet_workers_died.txt"))  # every time with more than one worker
        if kind and fire(epoch, kind):
            time.sleep(epoch_s / 2)
            if kind == "crash":
                event("crash")
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if kind in ("oom", "oomabrt"):
                oom_traceback()
                if kind == "oomabrt":
                    sys.stderr.write("terminate called without an active exception\n")
                    sys.stderr.flush()
                    os.kill(os.getpid(), signal.SIGABRT)
                sys.exit(1)
            if kind == "hostoom":
                sys.stderr.write("RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. "
                                 "DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                 "2147483648 bytes. Error code 12 (Cannot allocate memory)\n")
                sys.exit(1)
            if kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                while True:
                    time.sleep(1)
            if kind == "nan":
                nan = True
            if kind == "enospc":
                enospc = True
            if kind == "daemon":
                start_daemon(out)
        time.sleep(epoch_s)
        dice = dice_for(epoch, nan)
        vals = [d for d in dice if d == d]
        mfd = sum(vals) / len(vals) if vals else float("nan")
        logging["mean_fg_dice"].append(mfd)
        ema = logging["ema_fg_dice"][epoch - 1] * 0.9 + 0.1 * mfd if logging["ema_fg_dice"] else mfd
        logging["ema_fg_dice"].append(ema)
        logging["dice_per_class_or_region"].append(dice)
        tl = float("nan") if nan else round(-0.3 - 0.01 * epoch, 4)
        logging["train_losses"].append(tl)
        logging["val_losses"].append(tl)
        log("train_loss", tl)
        log("val_loss", tl)
        log("Pseudo dice", "[" + ", ".join(f"np.float32({round(d, 4)})" for d in dice) + "]")
        log(f"Epoch time: {round(time.time() - t0, 2)} s")
        if (epoch + 1) % save_every == 0 and epoch != num_epochs - 1:
            save("checkpoint_latest.pth", epoch)
        if enospc:
            save("checkpoint_best.pth", epoch, fail=True)
        if best_ema is None or ema > best_ema:
            best_ema = ema
            log(f"Yayy! New best EMA pseudo Dice: {round(best_ema, 4)}")
            save("checkpoint_best.pth", epoch)
    save("checkpoint_final.pth", num_epochs - 1)
    latest = os.path.join(out, "checkpoint_latest.pth")
    if os.path.exists(latest):
        os.remove(latest)
    os.kill(worker, signal.SIGTERM)
    os.waitpid(worker, 0)
    log("Training done.")
    validate_and_exit()


if __name__ == "__main__":
    main()
