"""The batch-size fit's probe: `python -m supervisor.trainer.fit_probe REQUEST` in the trainer's environment,
started by integrations/fit.py; never imported by the supervisor (which never imports torch).

How it works
- REQUEST (JSON): the plans file, dataset.json, the -tr trainer, the plans' name, configuration, fold,
  the headroom, the iterations per batch size and the time bound (max_seconds, counted from this
  process's start: torch's import and the network's build spend it too).
- It reads the plans' batch size, patch size and nnU-Net's dataset cap (core/batch_fit.py), then hands
  core/batch_fit.search a `measure(bs)`: on CUDA (CudaMeter) nnU-Net's own training step (`NnunetStep`:
  get_trainer_from_args builds the trainer nnUNetv2_train would, with its network, deep supervision, loss,
  optimizer and AMP grad scaler; cudnn.benchmark as nnUNetv2_train sets it) runs `iterations` times on
  random tensors of the patch size, and the peak is torch.cuda.max_memory_allocated after
  reset_peak_memory_stats; a CUDA OOM (or a batch too large for a kernel's 32-bit indexing) is None and
  ends the way up. With CARDIACSEG_FIT_MODEL set (the tests' hook, integrations/fit.MODEL_ENV), a memory
  model is measured instead (`ModelMeter`); the search and the choice are the same code.
- After every probe, and at the end, it prints its answer as a `CARDIACSEG_PROBE <json>` line: the table
  [[batch size, peak bytes or null (OOM), seconds], ...], the GPU's name, UUID and total memory, the
  largest batch size the plans can use and why, why the search stopped early, or the error. The last
  line counts, so a probe killed at its time bound still reports what it measured. A failure (a bad plans
  file, torch without CUDA, nnU-Net failing to build the trainer) is an answer with an error, no traceback.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import threading
import time

from supervisor.core import batch_fit
from supervisor.integrations.fit import MODEL_ENV
from supervisor.integrations.probes import MARKER

ANSWER_MARGIN_S = 5.0  # of the time bound, kept for printing the answer and tearing CUDA down
OOM_WORDS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_INITIALIZED",
             "canUse32BitIndexMath")  # the last: a batch too large for a kernel; it cannot train either


class FitError(Exception):
    """The probe cannot measure; str() says why and what to change."""


def emit(ans: dict) -> None:
    print(MARKER + json.dumps(ans), flush=True)


def main(argv=None) -> int:
    t0 = time.monotonic()
    argv = sys.argv if argv is None else argv
    ans = {"table": [], "gpu": None, "uuid": None, "total_bytes": None, "upper": None, "upper_why": "",
           "stopped": None, "error": None, "model": bool(os.environ.get(MODEL_ENV))}
    try:
        run(json.loads(argv[1]), ans, t0)
    except (FitError, batch_fit.FitInputError) as e:
        ans["error"] = str(e)
    except Exception as e:  # nnU-Net or torch failing to build the step is an answer, not a traceback
        ans["error"] = f"{type(e).__name__}: {e}"
    emit(ans)
    return 0


def _json(path: str, what: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except OSError as e:
        raise FitError(f"{path}: cannot read the {what}: {e.strerror}") from None
    except ValueError as e:
        raise FitError(f"{path}: the {what} is not valid JSON ({e})") from None


def run(req: dict, ans: dict, t0: float) -> None:
    plans, dataset = _json(req["plans"], "plans file"), _json(req["dataset_json"], "dataset.json")
    try:
        bs0 = batch_fit.batch_size(plans, req["configuration"])
        patch = batch_fit.patch_size(plans, req["configuration"])
        cap, why = batch_fit.dataset_cap(plans, req["configuration"], dataset)
    except batch_fit.FitInputError as e:
        raise FitError(f"{req['plans']}: {e}") from None
    upper = batch_fit.upper_bound(cap, bs0)
    ans.update(upper=upper, upper_why=why if cap is not None else f"{why}: at most the plans' {bs0}")
    spec = os.environ.get(MODEL_ENV)
    meter = ModelMeter(spec, patch, req) if spec else CudaMeter(req)
    ans.update(meter.identity())
    limit = batch_fit.limit_bytes(ans["total_bytes"], float(req["headroom"]))
    budget = float(req["max_seconds"]) - (time.monotonic() - t0) - ANSWER_MARGIN_S

    def measure(bs):
        peak, secs = meter.measure(bs, int(req["iterations"]))
        ans["table"].append([bs, peak, round(secs, 3)])
        emit(ans)  # after every probe: a probe ended at its time bound still tells what it measured
        return peak, secs

    table, stopped = batch_fit.search(measure, bs0, upper, limit, budget)
    ans.update(table=table, stopped=stopped)


class NnunetStep:
    """nnU-Net's own training step, as nnUNetv2_train builds it, fed random tensors of the patch size."""

    def __init__(self, req: dict, device: str):
        import torch
        from torch.backends import cudnn
        from nnunetv2.run.run_training import get_trainer_from_args

        if device == "cuda":  # as nnUNetv2_train sets them: the autotuned kernels' workspace counts too
            cudnn.deterministic, cudnn.benchmark = False, True
        fold = req["fold"]
        t = get_trainer_from_args(req["dataset"], req["configuration"], int(fold) if fold.isdigit() else fold,
                                  req["trainer"], req["plans_name"], device=torch.device(device))
        t.initialize()
        try:
            t.set_deep_supervision_enabled(t.enable_deep_supervision)  # what on_train_start does
        except AttributeError:
            pass  # an architecture without nnU-Net's decoder switch: built as its trainer builds it
        self.torch, self.t = torch, t
        self.patch = [int(p) for p in t.configuration_manager.patch_size]
        self.scales = t._get_deep_supervision_scales()
        lm = t.label_manager
        self.regions, self.heads, self.ignore = lm.has_regions, lm.num_segmentation_heads, lm.ignore_label
        self.channels = t.num_input_channels

    def _seg(self, bs: int, shape: list[int]):
        torch = self.torch
        if self.regions:  # one boolean channel per region (+ the ignore channel), as the region transform makes
            return torch.rand(bs, self.heads + (self.ignore is not None), *shape) > 0.5
        return torch.randint(0, self.heads, (bs, 1, *shape), dtype=torch.int16)

    def batch(self, bs: int) -> dict:
        data = self.torch.randn(bs, self.channels, *self.patch)
        if self.scales is None:
            return {"data": data, "target": self._seg(bs, self.patch)}
        # DownsampleSegForDSTransform's shapes: round(side x scale) per deep supervision output
        return {"data": data, "target": [self._seg(bs, [round(p * s) for p, s in zip(self.patch, sc)])
                                         for sc in self.scales]}

    def run(self, bs: int, iterations: int) -> None:
        b = self.batch(bs)
        for _ in range(iterations):
            self.t.train_step(b)

    def recover(self) -> None:
        """After an OOM: no gradients left, a fresh grad scaler (an OOM inside its step leaves it unusable)."""
        self.t.optimizer.zero_grad(set_to_none=True)
        if self.t.grad_scaler is not None:
            try:
                from torch import GradScaler
                self.t.grad_scaler = GradScaler("cuda")
            except ImportError:  # torch < 2.3
                from torch.cuda.amp import GradScaler
                self.t.grad_scaler = GradScaler()
        gc.collect()


class CudaMeter:
    def __init__(self, req: dict):
        import torch

        if not torch.cuda.is_available():
            raise FitError(f"torch {torch.__version__} sees no CUDA device (training.device = \"cuda\"; "
                           f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        self.torch = torch
        self.step = NnunetStep(req, "cuda")

    def identity(self) -> dict:
        props = self.torch.cuda.get_device_properties(0)
        uuid = getattr(props, "uuid", None)
        return {"gpu": props.name, "uuid": str(uuid) if uuid else None, "total_bytes": int(props.total_memory)}

    def measure(self, bs: int, iterations: int):
        torch = self.torch
        gc.collect()
        torch.cuda.empty_cache()  # what the last size cached is not this size's peak
        torch.cuda.reset_peak_memory_stats()
        t = time.monotonic()
        try:
            self.step.run(bs, iterations)
            torch.cuda.synchronize()
            peak = int(torch.cuda.max_memory_allocated())
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.cuda.OutOfMemoryError) and not any(w in str(e) for w in OOM_WORDS):
                raise
            print(f"batch size {bs}: {str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)
            peak = None
            self.step.recover()
            torch.cuda.empty_cache()
        return peak, time.monotonic() - t


class ModelMeter:
    """The tests' memory model (CARDIACSEG_FIT_MODEL, JSON): peak = fixed_bytes + per_sample_bytes x batch size
    (or per_voxel_bytes x the patch's voxels per sample); a CUDA OOM above oom_bytes (default total_bytes);
    seconds = seconds_per_sample x batch size x iterations, simulated (nothing waits); `hang_at`: the probe
    of a batch size at or above it never returns (a stuck driver: only the time bound ends it); `real_step`:
    nnU-Net's real step runs on the CPU too (its plumbing checked without a GPU; seconds then measured)."""

    def __init__(self, text: str, patch: list[int], req: dict):
        try:
            m = json.loads(text)
            total = int(m["total_bytes"])
            self.fixed = int(m.get("fixed_bytes", 0))
            self.per = int(m["per_sample_bytes"]) if "per_sample_bytes" in m else \
                int(float(m["per_voxel_bytes"]) * math.prod(patch))
        except (ValueError, KeyError, TypeError) as e:
            raise FitError(f"{MODEL_ENV}: expected JSON with total_bytes and per_sample_bytes or per_voxel_bytes "
                           f"({type(e).__name__}: {e})") from None
        self.m, self.total = m, total
        self.oom = int(m.get("oom_bytes", total))
        self.step = NnunetStep(req, "cpu") if m.get("real_step") else None

    def identity(self) -> dict:
        return {"gpu": self.m.get("name", "memory model"), "uuid": self.m.get("uuid", "model-0"),
                "total_bytes": self.total}

    def measure(self, bs: int, iterations: int):
        hang = self.m.get("hang_at")
        if hang is not None and bs >= hang:
            threading.Event().wait()  # a stuck CUDA call, as the supervisor sees one: silence until killed
        peak = self.fixed + self.per * bs
        secs = float(self.m.get("seconds_per_sample", 0.01)) * bs * iterations
        if self.step is not None:
            t = time.monotonic()
            self.step.run(bs, iterations)
            secs = time.monotonic() - t
        return (None if peak > self.oom else peak), secs


if __name__ == "__main__":
    sys.exit(main())
