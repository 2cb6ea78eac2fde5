"""The supervisor's state record: `State` (where the job stands) and `Sup` (everything decide needs).

How it works: `Sup` is a frozen dataclass; policy.decide returns a new one per event. Every time in it is
MONOTONIC (deadlines, pause start, last progress, restart times), so a clock step never fires or delays
a deadline. `to_json` stores them as wall-clock equivalents (readable by people and by `status`);
`from_json` re-bases them onto the reading process's monotonic clock and rejects anything that is not a
valid Sup with ValueError, so a damaged state.json is moved aside instead of crashing every start.
State changes only through core/transition.py's `transition()`; the policy checks every move against
the rule that made it.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

from supervisor.core.classify import Reason

class State(str, enum.Enum):
    IDLE = "idle"                  # no attempt (yet): the batch-size fit runs here, before the first one
    RUNNING = "running"            # an attempt: its checkpoint being chosen, then its trainer running
    PAUSED = "paused"              # SIGSTOPped for heat
    STOP_PENDING = "stop_pending"  # a stop is decided; waiting for the safe point
    STOPPING = "stopping"          # SIGINT sent; SIGKILL at stop_deadline
    BACKOFF = "backoff"            # waiting to restart (or for SetBatchSize's result)
    COOLING = "cooling"            # stopped for heat; restart once cool
    NO_SPACE = "no_space"          # died of a full disk; restart once there is room
    REQUEUING = "requeuing"        # stopped for SLURM's time limit or preemption; asking SLURM to requeue
    DONE = "done"
    FAILED = "failed"


TERMINAL = frozenset({State.DONE, State.FAILED})
ACTIVE = frozenset({State.RUNNING, State.PAUSED, State.STOP_PENDING, State.STOPPING})
DEADLINES = ("safe_deadline", "stop_deadline", "restart_at", "paused_at", "last_progress", "disk_deadline",
             "next_disk_check", "reap_deadline", "gpu_deadline", "kill_deadline", "cool_deadline", "fit_deadline")
DICTS = ("temps", "restart_reasons", "gpu_faults")
# Fields that change every few seconds and matter only to the running process: a change of these alone is
# not worth a state.json write (the next durable change carries them along).
VOLATILE = frozenset({"last_progress", "writing", "final_phase", "temps", "failed_reads", "next_disk_check",
                      "cool_deadline"})


@dataclass(frozen=True)
class Sup:
    state: State = State.IDLE
    attempt: int = 0                       # attempts started so far
    stop_reason: Reason | None = None      # why we are stopping it (STOP_PENDING/STOPPING)
    safe_deadline: float | None = None     # STOP_PENDING: SIGINT at the latest then
    stop_deadline: float | None = None     # STOPPING: SIGKILL then
    killed: bool = False                   # SIGKILL sent to this attempt
    kill_deadline: float | None = None     # ... and it must be gone by then (else: unkillable, give up)
    stop_asked: bool = False               # a stop request arrived while a stop was already pending/underway
    restart_at: float | None = None        # BACKOFF: spawn then (None: waiting for an action's result)
    restart_counts: bool = True            # the coming restart counts against the crash budget
    restart_times: tuple = ()              # monotonic times of counted restarts (intensity window)
    consecutive_failures: int = 0
    progress: bool = False                 # this attempt finished an epoch
    last_reason: Reason | None = None
    outcome: str | None = None             # final: completed / target_reached / stopped / gave_up / ...
    message: str | None = None
    exit_code: int | None = None
    batch_size: int | None = None          # current, as written in the plans file
    original_batch_size: int | None = None
    oom_steps: int = 0
    n_proc_da: int | None = None           # augmentation workers passed to the trainer
    paused_at: float | None = None
    paused_total: float = 0.0              # seconds paused for heat, all attempts
    failed_reads: int = 0                  # thermal polls in a row without every reading
    temps: dict = field(default_factory=dict)
    nonfinite_streak: int = 0
    since_best: int = 0
    writing: bool = False                  # between an epoch's last line and the next: saves may run
    final_phase: bool = False              # after "Training done.": final validation
    last_progress: float | None = None     # monotonic time of the last epoch line (or the spawn)
    epochs_this_attempt: int = 0
    epoch_times: tuple = ()                # the last 20 epoch times (hang limit)
    validate_only: bool = False            # the attempt runs the final validation only (--val)
    disk_deadline: float | None = None     # NO_SPACE: give up then
    next_disk_check: float | None = None
    disk_needed: int | None = None
    slurm_restarts: int | None = None      # SLURM_RESTART_COUNT of this job (None outside SLURM)
    bottleneck: dict | None = None         # the last epoch's verdict (diagnose.Verdict.to_json())
    resume_from: str | None = None         # the checkpoint the current attempt's --c loads
    suspect: str | None = None             # a checkpoint the last attempt died loading: moved aside next
    restarts: int = 0                      # attempts started because the previous one ended (the one count)
    restart_reasons: dict = field(default_factory=dict)  # reason -> restarts it caused
    exited: bool = False                   # the attempt's main process is gone; its remnants are being reaped
    exit_after_stop: bool = False          # ... and it went after our SIGINT (so our stop explains the exit)
    reap_deadline: float | None = None     # reaping the attempt's remnants ends then, whatever is left
    gpu_deadline: float | None = None      # waiting for its GPU memory to be freed ends then
    reap_overdue: bool = False             # the remnants outlived reap_deadline (logged once)
    taking_over: bool = False              # the attempt is another trainer, stopped at its safe point for us
    cool_deadline: float | None = None     # COOLING: without a complete reading until then, give up
    export_procs: int | None = None        # nnUNet_def_n_proc for the final validation (halved after a hang)
    rerun_validation: bool = False         # the final validation hung: the next attempt runs --val only
    compile_off: bool = False              # torch.compile failed: later attempts get nnUNet_compile=f
    workers_died: int = 0                  # attempts ended by dead augmentation workers since the last lowering
    diverged_from: int | None = None       # the first epoch of the non-finite streak (diverged)
    gpu_faults: dict = field(default_factory=dict)  # NVML index -> hardware errors it reported (unhealthy)
    tuning: dict | None = None             # the worker trial (rules_tune): phase, from, to, before_s, after_s
    fit: dict | None = None                # the batch-size fit (rules_fit): phase, GPU, probe table, choice
    fit_deadline: float | None = None      # IDLE, fit probing: end the probe then ([tune] fit_max_seconds)

    def durably_differs(self, other: "Sup") -> bool:
        """True when a field other than the VOLATILE ones differs (state.json must be written)."""
        return any(getattr(self, f.name) != getattr(other, f.name) for f in dataclasses.fields(self)
                   if f.name not in VOLATILE)

    def to_json(self, now: float, wall: float) -> dict:
        # shallow (asdict deep-copies every value; this runs after every epoch): only dicts are copied
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(temps=dict(self.temps), restart_reasons=dict(self.restart_reasons), gpu_faults=dict(self.gpu_faults),
                 bottleneck=dict(self.bottleneck) if self.bottleneck else None,
                 tuning=dict(self.tuning) if self.tuning else None)
        d["fit"] = dict(self.fit) if self.fit else None
        d["state"] = self.state.value
        for k in ("last_reason", "stop_reason"):
            d[k] = getattr(self, k).value if getattr(self, k) else None
        for k in DEADLINES:  # monotonic -> wall clock, for people and for the next process
            d[k] = None if d[k] is None else d[k] - now + wall
        d["restart_times"] = [t - now + wall for t in self.restart_times]
        d["epoch_times"] = list(self.epoch_times)
        # derived, for the queue and other readers of state.json (from_json ignores it)
        d["unhealthy_gpus"] = sorted(int(g) for g in self.gpu_faults if str(g).isdigit())
        return d

    @classmethod
    def from_json(cls, d: dict, now: float, wall: float) -> "Sup":
        """Rebuild from state.json; ValueError for anything that is not a valid Sup (moved aside)."""
        if not isinstance(d, dict):
            raise ValueError("'sup' is not an object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k not in fields:
                continue
            default = fields[k].default if fields[k].default is not dataclasses.MISSING else {}
            if k == "state":
                v = State(v)
            elif k in ("last_reason", "stop_reason"):
                v = Reason(v) if v is not None else None
            elif k in ("resume_from", "suspect"):
                if v is not None and not isinstance(v, str):
                    raise ValueError(f"sup.{k}: expected a file name, got {v!r}")
            elif k in ("restart_times", "epoch_times"):
                if not isinstance(v, list) or not all(_num(x) for x in v):
                    raise ValueError(f"sup.{k}: expected a list of numbers")
                v = tuple(x - wall + now for x in v) if k == "restart_times" else tuple(v)
            elif k in (*DICTS, "bottleneck", "tuning", "fit"):
                if not isinstance(v, dict) and not (k in ("bottleneck", "tuning", "fit") and v is None):
                    raise ValueError(f"sup.{k}: expected an object")
                if k == "restart_reasons" and not all(isinstance(n, int) and n >= 0 for n in v.values()):
                    raise ValueError(f"sup.{k}: expected counts")
                if k == "gpu_faults" and not all(isinstance(t, str) for t in v.values()):
                    raise ValueError(f"sup.{k}: expected GPU -> text")
                if v is not None and k in _RECORDS and (why := _RECORDS[k](v)):
                    raise ValueError(f"sup.{k}: {why}")
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"sup.{k}: expected true/false, got {v!r}")
            elif isinstance(default, (int, float)) or default is None:
                if v is not None and not (_num(v) or (isinstance(v, str) and k in ("outcome", "message"))):
                    raise ValueError(f"sup.{k}: expected a number, got {v!r}")
                if k in DEADLINES and v is not None:
                    v = v - wall + now
            out[k] = v
        return cls(**out)


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _tuning_problem(t: dict) -> str | None:
    """What rules_tune relies on in a worker trial's record (its arithmetic and comparisons)."""
    if t.get("phase") not in ("trial", "reverting", "kept", "reverted", "abandoned"):
        return f"phase {t.get('phase')!r} is not a worker trial's"
    if not (_count(t.get("from")) and _count(t.get("to"))):
        return "from/to: expected worker counts >= 1"
    if not _num(t.get("before_s")) or not (t.get("after_s") is None or _num(t.get("after_s"))):
        return "before_s/after_s: expected seconds"
    return None


def _fit_problem(f: dict) -> str | None:
    """What rules_fit relies on in a batch-size fit's record (the rest is only shown, by batch_fit.describe)."""
    if not isinstance(f.get("phase"), str):
        return "phase: expected a text"
    if "headroom" in f and not (_num(f["headroom"]) and 0 <= f["headroom"] < 1):
        return "headroom: expected a fraction in [0, 1)"
    if any(f.get(k) is not None and not _count(f.get(k)) for k in ("from", "chosen", "upper")):
        return "from/chosen/upper: expected batch sizes >= 1"
    if f.get("total_bytes") is not None and not _num(f.get("total_bytes")):
        return "total_bytes: expected a number"
    return None


_RECORDS = {"tuning": _tuning_problem, "fit": _fit_problem}  # records whose fields the rules compute with
