"""Known-bad versions: the torch / nnunetv2 / numpy / driver combinations nnU-Net users hit, each with its fix.

How it works (pure: what was measured goes in, findings come out; `check` and `run`'s start-up both ask)
- The trainer's environment is measured elsewhere (supervisor/trainer/versions.py, a child run with the
  trainer's environment: installed distributions' metadata, nothing imported) into `Versions`: nnunetv2,
  torch, numpy, torch's CUDA build, nnunetv2's own Requires-Dist lines, the driver's CUDA version (NVML)
  and whether the checkpoint `--c` resumes from was pickled under numpy 2.
- `release(v)` reads a version as PEP 440 orders its release part, which is all the rules need:
  '2.9.0+cu128' -> (2, 9, 0); a pre-release counts as its release ('2.6.0a0+git...' is what nightlies and
  NVIDIA's containers ship, with that release's behaviour); garbage or None -> None (no rule applies).
- nnunetv2's requirement on torch is read from its metadata (`Requires-Dist: torch!=2.9.*,>=2.1.2` in
  2.8.1), never hard-coded: `requirement()` parses a line, `allows()` evaluates its clauses on release
  tuples. Lines with an environment marker (extras, platforms) are not evaluated.
- The table: TORCH_SERIES (torch series known to be bad for nnU-Net, with why and when it matters) and
  the rules in `judge()`: torch excluded by nnunetv2's requirement or in a bad series; nnunetv2 < 2.6 with
  torch >= 2.6 (weights_only); a numpy-2 checkpoint under numpy 1; a driver older than torch's CUDA build
  (`cuda_mismatch`). Each finding names the versions, what goes wrong and the fix.
- `unpacks_at_start(nnunetv2)`: whether that nnunetv2 unpacks the preprocessed data when a training starts
  (before 2.6: folds started together race there; the queue staggers them, core/queue_policy.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FIXED_WEIGHTS_ONLY = (2, 6)   # nnunetv2 2.6.0 passes weights_only=False in nnUNetTrainer.load_checkpoint
WEIGHTS_ONLY_DEFAULT = (2, 6)  # torch 2.6 made weights_only=True torch.load's default
NO_UNPACK = (2, 6)            # nnunetv2 2.6 reads blosc2 in place; before, on_train_start unpacks npz -> npy
NUMPY2_MODULE = "numpy._core"  # numpy 2 pickles its scalars and dtypes under numpy._core (numpy 1: numpy.core)
FIX_WEIGHTS_ONLY = "pip install 'nnunetv2>=2.6' (or 'torch<2.6')"
FIX_NUMPY2 = "pip install 'numpy>=2' in the trainer's environment"


@dataclass(frozen=True)
class Series:
    prefix: tuple            # release prefix: (2, 9) is every 2.9.x
    why: str
    three_d_cuda_only: bool  # it matters for 3D configurations on CUDA only (else: a warning)


TORCH_SERIES = (
    Series((2, 9), "3D convolutions under mixed precision run about 4x slower than with torch 2.8 "
                   "(pytorch/pytorch#166122; nnunetv2 2.8 excludes the series: torch!=2.9.*)", True),
)


@dataclass(frozen=True)
class Versions:
    """What was measured in the trainer's environment (None: unknown or not installed)."""
    nnunetv2: str | None = None
    torch: str | None = None
    numpy: str | None = None
    torch_cuda: str | None = None        # torch.version.cuda: "12.8"; None for a CPU-only build
    nnunetv2_requires: tuple = ()        # nnunetv2's Requires-Dist lines, as its metadata has them
    driver_cuda: int | None = None       # NVML's CUDA driver version: 12020 = 12.2
    checkpoint: str | None = None        # the checkpoint `--c` resumes from (its name)
    checkpoint_numpy2: bool | None = None  # ... was pickled under numpy 2


@dataclass(frozen=True)
class Finding:
    level: str   # "fatal" | "warning" | "ok"
    rule: str    # which rule of the table
    text: str

    @property
    def fatal(self) -> bool:
        return self.level == "fatal"


_RELEASE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def release(v: str | None) -> tuple[int, ...] | None:
    """'2.9.0+cu128' -> (2, 9, 0), '2.6.0a0+git34ab' -> (2, 6, 0), '2.10' -> (2, 10); None when unreadable."""
    m = _RELEASE.match(v) if isinstance(v, str) else None
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _cmp(a: tuple, b: tuple) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


_CLAUSE = re.compile(r"^(~=|===|==|!=|<=|>=|<|>)\s*(\S+)$")


def requirement(line: str) -> tuple[str, tuple, str] | None:
    """'torch!=2.9.*,>=2.1.2' -> ('torch', (('!=', '2.9.*'), ('>=', '2.1.2')), ''); the marker after ';' is
    kept as text; None when the line is not a requirement."""
    if not isinstance(line, str):
        return None
    spec, _, marker = line.partition(";")
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?\s*$", spec)
    if not m:
        return None
    clauses = []
    for part in (p.strip() for p in m.group(2).split(",") if p.strip()):
        c = _CLAUSE.match(part)
        if c is None:
            return None
        clauses.append((c.group(1), c.group(2)))
    return m.group(1).lower().replace("_", "-"), tuple(clauses), marker.strip()


def allows(clauses: tuple, version: str) -> bool | None:
    """Whether `version` meets every clause (release parts only); None when a clause cannot be judged."""
    v = release(version)
    if v is None:
        return None
    for op, want in clauses:
        if want.endswith(".*") and op in ("==", "!="):
            prefix = release(want[:-2])
            if prefix is None:
                return None
            same = v[:len(prefix)] + (0,) * (len(prefix) - len(v[:len(prefix)])) == prefix
            if same != (op == "=="):
                return False
            continue
        w = release(want)
        if w is None or op == "===":
            return None
        c = _cmp(v, w)
        ok = {"==": c == 0, "!=": c != 0, "<": c < 0, "<=": c <= 0, ">": c > 0, ">=": c >= 0,
              "~=": c >= 0 and v[:max(1, len(w) - 1)] == w[:max(1, len(w) - 1)]}[op]
        if not ok:
            return False
    return True


def torch_requirement(requires: tuple) -> tuple | None:
    """nnunetv2's unconditional requirement on torch (its clauses), None when it has none."""
    for line in requires:
        r = requirement(line)
        if r and r[0] == "torch" and not r[2]:
            return r[1]
    return None


def _spec(clauses: tuple) -> str:
    return ",".join(op + v for op, v in clauses)


def unpacks_at_start(nnunetv2: str | None) -> bool:
    """Does this nnunetv2 unpack the preprocessed data when a training starts (folds started together then
    race on the same files)? Unknown versions are taken as yes: staggering costs minutes, a race a run."""
    v = release(nnunetv2)
    return v is None or _cmp(v, NO_UNPACK) < 0


def cuda_mismatch(driver: int | None, built: str | None) -> Finding | None:
    """The driver's CUDA version (NVML's integer: 12020 = 12.2) against the one torch was built for
    (torch.version.cuda: "12.1"; None for a CPU-only build). None when there is nothing to report."""
    b = release(built) if built else None
    if driver is None or not b:
        return None
    d = (driver // 1000, driver % 1000 // 10)
    b = (b + (0,))[:2]
    if d >= b:
        return None
    fix = (f"install a torch built for CUDA {d[0]}.{d[1]} or older: pip install --force-reinstall torch "
           f"--index-url https://download.pytorch.org/whl/cuXYZ (XYZ = a CUDA version <= {d[0]}{d[1]}, e.g. "
           f"cu{d[0]}{min(d[1], 8)}; the indexes that exist are listed at pytorch.org/get-started/previous-versions), "
           "or update the NVIDIA driver")
    if d[0] < b[0]:
        return Finding("fatal", "driver_cuda", f"torch was built for CUDA {built} but the driver supports CUDA "
                                               f"{d[0]}.{d[1]}: torch cannot use the GPU; {fix}")
    return Finding("warning", "driver_cuda", f"torch was built for CUDA {built}, the driver supports CUDA {d[0]}.{d[1]}: "
                                             f"it usually runs (minor-version compatibility) but JIT-compiled kernels "
                                             f"may fail; {fix}")


def _torch(v: Versions, cuda: bool, three_d: bool) -> list[Finding]:
    t = release(v.torch)
    if t is None:
        return []
    req = torch_requirement(v.nnunetv2_requires)
    excluded = req is not None and allows(req, v.torch) is False
    series = next((s for s in TORCH_SERIES if t[:len(s.prefix)] == s.prefix), None)
    if not excluded and series is None:
        return []
    what = f"torch {v.torch}"
    if excluded:
        what += f" is excluded by nnunetv2 {v.nnunetv2}'s own requirement (torch{_spec(req)})"
    else:
        what += " is a known-bad series for nnU-Net"
    why = series.why if series else "nnU-Net's developers exclude it"
    fix = (f"pip install 'torch{_spec(req)}'" if excluded else
           "pip install 'torch!=" + ".".join(map(str, series.prefix)) + ".*'")
    fix += " (with the --index-url of your CUDA build, as for the torch you have)"
    harmless = series is not None and series.three_d_cuda_only and not (cuda and three_d)
    level = "warning" if harmless else "fatal"
    tail = " (this job: not a 3D configuration on CUDA, so it matters less)" if harmless else ""
    return [Finding(level, "torch_excluded", f"{what}: {why}{tail}; fix: {fix}")]


def judge(v: Versions, device: str = "cuda", three_d: bool = True) -> list[Finding]:
    """Every known-bad combination in `v` (empty: none), for a job on `device` whose configuration is 3D or not."""
    out = _torch(v, device == "cuda", three_d)
    n, t, np_ = release(v.nnunetv2), release(v.torch), release(v.numpy)
    if n is not None and t is not None and _cmp(n, FIXED_WEIGHTS_ONLY) < 0 and _cmp(t, WEIGHTS_ONLY_DEFAULT) >= 0:
        out.append(Finding("fatal", "weights_only", (
            f"nnunetv2 {v.nnunetv2} with torch {v.torch}: nnunetv2 before 2.6 loads checkpoints with torch.load's "
            "default, which torch 2.6 made weights_only=True, and that refuses nnU-Net's checkpoints "
            "('Weights only load failed'): `--c` (every restart), `--val` and the final validation fail "
            f"(nnunetv2 2.5.2 fixed only nnUNetv2_predict); fix: {FIX_WEIGHTS_ONLY}")))
    if v.checkpoint_numpy2 and np_ is not None and np_[0] < 2:
        out.append(Finding("fatal", "numpy2_checkpoint", (
            f"{v.checkpoint or 'the checkpoint'} was pickled under numpy 2 (it names {NUMPY2_MODULE}) and numpy here "
            f"is {v.numpy}: `--c` fails with No module named '{NUMPY2_MODULE}'; fix: {FIX_NUMPY2}")))
    if device == "cuda" and (m := cuda_mismatch(v.driver_cuda, v.torch_cuda)) is not None:
        out.append(m)
    return out


def pickled_under_numpy2(modules) -> bool:
    """Whether a pickle that names these modules was written under numpy 2 (numpy 1 cannot load it)."""
    return any(m == NUMPY2_MODULE or m.startswith(NUMPY2_MODULE + ".") for m in modules)


def describe(v: Versions) -> str:
    """'nnunetv2 2.8.1, torch 2.14.1 (CPU-only build), numpy 2.3.5' for an ok line."""
    parts = [f"nnunetv2 {v.nnunetv2 or 'not installed'}"]
    if v.torch:
        parts.append(f"torch {v.torch} (" + (f"CUDA {v.torch_cuda}" if v.torch_cuda else "CPU-only build") + ")")
    else:
        parts.append("torch not installed")
    parts.append(f"numpy {v.numpy or 'not installed'}")
    return ", ".join(parts)
