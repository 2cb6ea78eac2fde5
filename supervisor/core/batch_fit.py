"""The batch-size fit's arithmetic ([tune] batch_size_fit): the search, the choice, and the plans' own cap.

How it works (pure: no I/O, no clock; trainer/fit_probe.py runs `search` in the probe child, the policy
runs `choose` on the child's answer, so both judge a probe with the same `fits`):
- `dataset_cap`: nnU-Net's planner caps a configuration's batch size so that one batch covers at most 5 %
  of the dataset's voxels, and never below 2 (ExperimentPlanner.max_dataset_covered, UNet_min_batch_size,
  in default_experiment_planner.py: round(n_voxels_dataset x 0.05 / prod(patch_size))). n_voxels_dataset
  is the configuration's median image size (the plans' median_image_size_in_voxels) x numTraining of
  dataset.json; a 2d configuration counts the 3D volume (3d_fullres's median), as the planner does. The
  fit never probes nor chooses above it; when the plans cannot tell, it never goes above the plans' size.
- `search(measure, start, upper, limit, budget_s)`: `measure(bs)` runs a few training steps at batch size
  bs and returns (peak bytes, or None for a CUDA OOM; seconds). From the plans' size it doubles while
  the peak fits (at most `limit` = total x (1 - headroom)), up to `upper`; after the first size that does
  not fit (an OOM, or a peak over the limit), it bisects between the largest that fit and the smallest
  that did not. It stops early (`stopped`) when the next probe, as long as the last one per sample, would
  pass the time budget, or after MAX_PROBES probes (a hostile batch size of 10**9 bisects down in ~30).
  The seconds come from the measurements, so the search itself reads no clock.
- `choose`: the largest probed size whose peak fits, within `upper`, and at least `floor` (1, or
  [oom] min_batch_size: a smaller size would make the next start refuse the plans); None when none does:
  the plans' size stays and the OOM step-down remains the safety net.
"""
from __future__ import annotations

import math

MAX_DATASET_COVERED = 0.05  # nnU-Net's ExperimentPlanner.max_dataset_covered
PLANNER_MIN_BATCH = 2       # nnU-Net's ExperimentPlanner.UNet_min_batch_size
MAX_PROBES = 24
MAX_DIM = 2 ** 31           # a patch or image side beyond this is not a plan, it is a hostile file


class FitInputError(ValueError):
    """The plans or dataset.json cannot be used for the fit; str() names the file's key and what was expected."""


def limit_bytes(total_bytes: int, headroom: float) -> int:
    """The most a training step may peak at: the GPU's memory less the headroom kept free."""
    return int(total_bytes * (1.0 - headroom))


def fits(peak, limit: int) -> bool:
    return peak is not None and peak <= limit


def configuration(plans: dict, name: str) -> dict:
    """The plans' configuration with its inherits_from chain merged (as nnU-Net's PlansManager does)."""
    confs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(confs, dict):
        raise FitInputError("key 'configurations': expected an object of configurations")
    merged, seen = {}, []
    while name is not None:
        conf = confs.get(name)
        if not isinstance(conf, dict) or name in seen:
            raise FitInputError(f"key 'configurations.{name}': not found (has: {', '.join(map(str, confs))})")
        seen.append(name)
        merged = {**conf, **merged}
        name = conf.get("inherits_from")
    return merged


def batch_size(plans: dict, name: str) -> int:
    """The configuration's batch size, checked as nnU-Net would need it (an integer >= 1)."""
    bs = configuration(plans, name).get("batch_size")
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise FitInputError(f"key 'configurations.{name}.batch_size': expected an integer >= 1, got {bs!r}")
    return bs


def patch_size(plans: dict, name: str) -> list[int]:
    return _sides(configuration(plans, name).get("patch_size"), f"configurations.{name}.patch_size", int)


def _sides(v, where: str, kind) -> list:
    ok = (isinstance(v, list) and len(v) in (2, 3)
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
          and all(math.isfinite(x) and 0 < x < MAX_DIM for x in v)
          and (kind is not int or all(float(x).is_integer() for x in v)))
    if not ok:
        what = "integers" if kind is int else "numbers"
        raise FitInputError(f"key '{where}': expected 2 or 3 positive {what} below 2^31, got {v!r}")
    return [kind(x) for x in v]


def dataset_cap(plans: dict, name: str, dataset_json: dict) -> tuple[int | None, str]:
    """(the largest batch size the plans can use, how it was found), (None, why not) when unknown."""
    patch = patch_size(plans, name)
    conf = configuration(plans, name)
    try:
        median = _sides(conf.get("median_image_size_in_voxels"), f"configurations.{name}.median_image_size_in_voxels",
                        float)
    except FitInputError as e:
        return None, f"no dataset cap ({e})"
    n = dataset_json.get("numTraining") if isinstance(dataset_json, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None, f"no dataset cap (dataset.json key 'numTraining': expected an integer >= 1, got {n!r})"
    volume = median
    if len(patch) == 2:
        # the planner's 2d configuration divides the 3D dataset's voxels (3d_fullres's median image, or one
        # slice per case for a 2D dataset) by the 2D patch
        try:
            volume = _sides(configuration(plans, "3d_fullres").get("median_image_size_in_voxels"), "", float)
        except FitInputError:
            volume = median
    voxels = math.prod(volume) * n
    cap5 = round(voxels * MAX_DATASET_COVERED / math.prod(patch))
    cap = max(cap5, PLANNER_MIN_BATCH)
    return cap, (f"nnU-Net's planner cap: 5 % of {n} cases x {_shape(volume)} voxels per batch of "
                 f"{_shape(patch)} = {cap5}, at least {PLANNER_MIN_BATCH}")


def _shape(v) -> str:
    return "x".join(f"{x:g}" for x in v)


def upper_bound(cap: int | None, plans_bs: int) -> int:
    """Never above the dataset cap; without one, never above the plans' own size."""
    return cap if cap is not None else plans_bs


def search(measure, start: int, upper: int, limit: int, budget_s: float,
           max_probes: int = MAX_PROBES) -> tuple[list, str | None]:
    """([[batch size, peak bytes or None (OOM), seconds], ...] in probing order, why it stopped early or None)."""
    upper = max(1, upper)
    bs = max(1, min(start, upper))
    table: list = []
    good, bad, spent = 0, None, 0.0  # the largest size that fit, the smallest that did not
    while True:
        peak, secs = measure(bs)
        table.append([bs, peak, round(secs, 3)])
        spent += secs
        if fits(peak, limit):
            good = max(good, bs)
        else:
            bad = bs if bad is None else min(bad, bs)
        if bad is None:  # every size so far fit: double, up to the cap
            nxt = None if good >= upper else min(2 * good, upper)
        else:  # an OOM (or a peak over the limit) ends the way up: bisect below it
            nxt = None if bad - good <= 1 else (good + bad) // 2
        if nxt is None:
            return table, None
        if len(table) >= max_probes:
            return table, f"after {max_probes} probes"
        # a step's time grows with the batch: the next probe takes about this long
        if spent + secs * nxt / bs > budget_s:
            return table, f"time bound: {spent:.0f} s spent of {budget_s:.0f} s"
        bs = nxt


def choose(table, total_bytes: int | None, headroom: float, upper: int | None, floor: int = 1
           ) -> tuple[int | None, str]:
    """(the batch size to train with, why), or (None, why none): the plans' size stays."""
    if not total_bytes or not table:
        return None, "nothing was measured"
    limit = limit_bytes(total_bytes, headroom)
    ok = [row[0] for row in table if fits(row[1], limit) and (upper is None or row[0] <= upper)]
    if not ok:
        return None, (f"no probed batch size peaked within {gib(limit)} ({headroom:.0%} of {gib(total_bytes)} "
                      "kept free)")
    best = max(ok)
    if best < floor:
        return None, f"only {best} fits, below the floor {floor} ([oom] min_batch_size)"
    capped = ", the most the plans can use" if best == upper else ""
    return best, f"the largest probed batch size peaking within {gib(limit)}{capped}"


def same_gpu(a: str | None, b: str | None) -> bool:
    """NVML says GPU-<uuid>, torch says <uuid>: the same GPU when the UUIDs match."""
    def norm(u):
        return str(u).lower().removeprefix("gpu-") if u else None
    return norm(a) is not None and norm(a) == norm(b)


def gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def table_text(table) -> str:
    """The probes compactly, in probing order: `2: 7.9 GiB, 4: 14.3 GiB, 8: OOM, 6: 20.7 GiB`."""
    return ", ".join(f"{r[0]}: {'OOM' if r[1] is None else gib(r[1])}" for r in table if isinstance(r, list) and r)


def describe(fit: dict | None) -> str | None:
    """`status`'s line for the fit recorded in state.json (None: no fit); a damaged record is said so."""
    if not isinstance(fit, dict) or not fit.get("phase"):
        return None
    try:
        return _describe(fit)
    except (TypeError, ValueError, AttributeError, IndexError):
        return f"recorded in state.json but unreadable: {str(fit)[:200]}"


def _describe(fit: dict) -> str:
    phase, gpu = fit.get("phase"), fit.get("gpu") or "the GPU"
    if phase == "probing":
        return f"probing on {gpu} from batch size {fit.get('from')}"
    if phase == "cancelled":
        return f"ended by a stop before it was done (on {gpu}); the next run fits again"
    total, headroom = fit.get("total_bytes"), fit.get("headroom") or 0
    where = f"on {gpu} ({gib(total)}, {headroom:.0%} kept free" + (
        f": peak <= {gib(limit_bytes(total, headroom))})" if total else ")")
    probes = table_text(fit.get("table") or [])
    tail = (f"; probed {probes}" if probes else "") + (f"; stopped early: {fit['stopped']}" if fit.get("stopped")
                                                        else "")
    if fit.get("error"):
        return f"failed {where}: {fit['error']}; the plans' batch size {fit.get('from')} is used{tail}"
    if fit.get("chosen") is None:
        return f"kept {fit.get('from')} {where}: {fit.get('why')}{tail}"
    return f"{fit['chosen']} {where}, from {fit.get('from')}, at most {fit.get('upper')}{tail}"
