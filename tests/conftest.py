"""Shared fixtures: a job folder laid out like nnU-Net's, and the supervisor run as a real process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.integrations.store import StateStore

HERE = Path(__file__).parent
REPO = HERE.parent
FAKE = HERE / "fake_trainer.py"
DATASET = "Dataset001_Fake"
HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None and importlib.util.find_spec("torch") is not None
NNUNET_MISSING = ("nnunetv2 and torch are not installed here (`pip install -e '.[test]'` brings them): "
                  "tests of real nnU-Net / torch skip")

def pytest_collection_modifyitems(config, items):
    """Tests marked `nnunet` (and every `e2e` test: real nnU-Net) skip, with the reason, where it is absent."""
    if HAVE_NNUNET:
        return
    for item in items:
        if item.get_closest_marker("nnunet") or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.skip(reason=NNUNET_MISSING))

def toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)

def write_config(path: Path, sections: dict) -> Path:
    out = []
    for sec, body in sections.items():
        out.append(f"[{sec}]")
        out += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        out.append("")
    path.write_text("\n".join(out))
    return path

class LoggedPopen(subprocess.Popen):
    """The supervisor as a child whose output goes to a file: a pipe nobody reads until the end fills up
    after ~64 KiB and blocks the supervisor's logging (and so its loop). communicate() returns the log."""

    def __init__(self, argv, log_path: Path, **kw):
        self.log_path = log_path
        self._log = open(log_path, "w")
        super().__init__(argv, stdout=self._log, stderr=subprocess.STDOUT, **kw)

    def communicate(self, input=None, timeout=None):
        self.wait(None if timeout is None else timeout * slowdown())
        self._log.close()
        return self.log_path.read_text(), None

class Job:
    """A tmp folder with nnUNet_preprocessed/<dataset>/nnUNetPlans.json and nnUNet_results."""

    def __init__(self, root: Path):
        self.root = root
        self.pre = root / "preprocessed"
        self.results = root / "results"
        self.state = root / "state"
        (self.pre / DATASET).mkdir(parents=True)
        self.results.mkdir()
        self.plans = self.pre / DATASET / "nnUNetPlans.json"
        self.plans.write_text(json.dumps({
            "dataset_name": DATASET, "plans_name": "nnUNetPlans",
            "configurations": {"3d_fullres": {"batch_size": 2, "patch_size": [48, 48, 48]},
                               "3d_cascade_fullres": {"inherits_from": "3d_fullres"}},
        }, indent=4))
        (self.pre / DATASET / "dataset.json").write_text("{}")
        self.fold = self.results / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"

    def config(self, env: dict | None = None, **sections) -> Path:
        base = {
            "training": {"command": [sys.executable, str(FAKE)], "dataset": DATASET,
                         "configuration": "3d_fullres", "fold": 0, "device": "cpu",
                         "expected_epochs": 10},
            "paths": {"preprocessed": str(self.pre), "results": str(self.results),
                      "state_dir": str(self.state)},
            "restart": {"backoff_seconds": 0, "backoff_max_seconds": 0, "max_restarts": 5,
                        "window_minutes": 60},
            "stop": {"timeout_seconds": 20, "checkpoint_wait_seconds": 30},
            "environment": {"FAKE_EPOCH_S": "0.1", **(env or {})},
        }
        for sec, body in sections.items():
            base.setdefault(sec, {}).update(body)
        return write_config(self.root / "config.toml", base)

    def state_json(self) -> dict:
        return StateStore(self.state).read() or {}

    def wait_epochs(self, n: int, timeout: float = 60) -> None:
        """Wait until the supervisor has recorded at least n epochs in state.json."""
        wait_for(lambda: (self.state / "state.json").exists() and len(self.state_json()["epochs"]) >= n,
                 timeout=timeout, what=f"{n} epochs in state.json")

    def start(self, cfg: Path, extra_env: dict | None = None) -> "LoggedPopen":
        env = {**clean_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.runs = getattr(self, "runs", 0) + 1
        return LoggedPopen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO, env=env,
                           log_path=self.root / f"supervisor-{self.runs}.log")

    def run(self, cfg: Path, timeout: float = 120, extra_env: dict | None = None):
        p = self.start(cfg, extra_env)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise AssertionError(f"supervisor did not finish in {timeout * slowdown():.0f}s:\n{out[-5000:]}")
        return p.returncode, out

@pytest.fixture
def job(tmp_path) -> Job:
    return Job(tmp_path)

def slowdown() -> float:
    """How much slower than idle this machine is now: its 1-minute load per core (1 to 10), or
    CARDIACSEG_TEST_SLOWDOWN. Every wait in the tests is a bound only a hang should reach, never a timing
    goal (those are bench/'s); on a machine busy with other work it grows with the load instead of failing."""
    if os.environ.get("CARDIACSEG_TEST_SLOWDOWN"):
        return max(1.0, float(os.environ["CARDIACSEG_TEST_SLOWDOWN"]))
    return min(10.0, max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))


def clean_env() -> dict:
    """The tests' environment for a supervisor outside SLURM: a suite run inside an salloc/sbatch job (or a
    shell with a site's SLURM_CONF) must not make the supervisor think it is a SLURM job, nor reach that
    cluster. The SLURM tests set their own cluster's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def wait_for(pred, timeout=30.0, interval=0.05, what="condition"):
    timeout *= slowdown()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
