"""epochs.jsonl: the epochs beside a small state.json, so a save costs the same at epoch 10,000 as at 1."""
import json
import os

import pytest

from conftest import DATASET
from supervisor.integrations import epoch_log
from supervisor.integrations.epoch_log import EpochLog
from supervisor.integrations.store import StateStore


def rec(e: int, ema: float = 0.5) -> dict:
    return {"epoch": e, "ema": ema, "dice": [ema], "epoch_time": 1.0}


def test_a_rewind_drops_the_future_and_the_last_word_per_epoch_wins(tmp_path):
    log = EpochLog(tmp_path)
    log.rewrite([rec(0), rec(1)])
    for e in (2, 3, 4):
        log.append(rec(e))
    log.append(rec(3, ema=0.9))  # a resume from checkpoint_best went back to epoch 3
    log.close()
    got = epoch_log.read(tmp_path)
    assert [(r["epoch"], r["ema"]) for r in got] == [(0, 0.5), (1, 0.5), (2, 0.5), (3, 0.9)]


def test_torn_and_hostile_lines_are_skipped(tmp_path):
    lines = [json.dumps(rec(0)), "[1, 2]", '{"epoch": "1"}', '{"epoch": true}', "\x00" * 100, json.dumps(rec(1)),
             "x" * 100_000, json.dumps(rec(2))[:20]]  # the last line torn by a crash mid-write
    (tmp_path / epoch_log.FILE).write_text("\n".join(lines))
    assert [r["epoch"] for r in epoch_log.read(tmp_path)] == [0, 1]


def test_a_descending_file_is_read_in_one_pass(tmp_path):
    """Every line rewinds by one: each record is dropped once (no rescan per line)."""
    n = 200_000
    (tmp_path / epoch_log.FILE).write_text("".join(f'{{"epoch":{e}}}\n' for e in range(n, 0, -1)))
    assert epoch_log.read(tmp_path) == [{"epoch": 1}]


def test_a_planted_link_is_not_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(json.dumps(rec(7)) + "\n")
    (tmp_path / "state").mkdir()
    os.symlink(secret, tmp_path / "state" / epoch_log.FILE)
    with pytest.raises(ValueError, match="symbolic link"):
        epoch_log.read(tmp_path / "state")
    log = EpochLog(tmp_path / "state")
    log.append(rec(0))  # the link is moved aside and a regular file made; the target is untouched
    log.close()
    assert secret.read_text() == json.dumps(rec(7)) + "\n"
    assert [r["epoch"] for r in epoch_log.read(tmp_path / "state")] == [0]


def test_a_failed_append_raises_and_the_next_one_reopens(tmp_path):
    log = EpochLog(tmp_path)
    log.fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    with pytest.raises(OSError):
        log.append(rec(0))
    assert log.fd is None
    log.append(rec(0))
    log.close()
    assert epoch_log.read(tmp_path) == [rec(0)]


def test_state_json_stays_small_and_readers_get_every_epoch(job):
    """A supervised run: state.json holds a count, not the epochs; StateStore.read() (status, plot, tests)
    gives them all; a stale or planted epochs.jsonl is replaced by what nnU-Net's logs say."""
    job.state.mkdir(parents=True)
    (job.state / epoch_log.FILE).write_text(json.dumps(rec(999)) + "\n" + "garbage\n")
    cfg = job.config(env={"FAKE_EPOCHS": "6", "FAKE_EPOCH_S": "0.05"}, training={"expected_epochs": 6})
    p = job.start(cfg)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    raw = json.loads((job.state / "state.json").read_text())
    assert "epochs" not in raw and raw["epoch_count"] == 6 and raw["epochs_file"] == epoch_log.FILE
    full = StateStore(job.state).read()
    assert [e["epoch"] for e in full["epochs"]] == list(range(6))
    assert all(isinstance(e["ema"], float) for e in full["epochs"])
    assert (job.results / DATASET).is_dir()
