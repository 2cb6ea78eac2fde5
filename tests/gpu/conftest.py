"""The GPU acceptance run's one JSON summary: each test adds its figures to `summary`; at the end of the
session the summary is printed as one line (`GPU-CHECK {...}`) and written to $GPU_CHECK_JSON (default
gpu-check.json in the repository), so `make gpu-check` leaves one file a person can quote."""
import json
import os
from pathlib import Path

import pytest

_SUMMARY: dict = {}


@pytest.fixture(scope="session")
def summary() -> dict:
    return _SUMMARY


def pytest_sessionfinish(session, exitstatus):
    if not _SUMMARY:
        return
    _SUMMARY["exit_status"] = int(exitstatus)
    line = json.dumps(_SUMMARY, sort_keys=True, default=str)
    print("\nGPU-CHECK " + line)
    path = Path(os.environ.get("GPU_CHECK_JSON") or Path(__file__).resolve().parents[2] / "gpu-check.json")
    try:
        path.write_text(line + "\n")
    except OSError:
        pass
