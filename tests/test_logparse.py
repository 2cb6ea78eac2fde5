"""Training-log parsing and nnU-Net's EMA."""
import math

from supervisor.core.training_log import EpochAssembler, History, parse_dice, parse_line
from supervisor.integrations.log_follower import LogFollower

EPOCH3 = """2026-11-25 22:55:18.701000: 
2026-11-25 22:55:18.702000: Epoch 3 
2026-11-25 22:55:18.703000: Current learning rate: 0.00536 
2026-11-25 22:55:43.100000: train_loss -0.4443 
2026-11-25 22:55:43.150000: val_loss -0.4862 
2026-11-25 22:55:43.180000: Pseudo dice [np.float32(0.9623), np.float32(0.9225), np.float32(0.0)] 
2026-11-25 22:55:43.190388: Epoch time: 24.49 s 
2026-11-25 22:55:43.200000: Yayy! New best EMA pseudo Dice: 0.4052000045776367 
"""


def records(text):
    asm, out = EpochAssembler(), []
    for line in text.splitlines():
        ev = parse_line(line)
        if ev and (r := asm.feed(ev)):
            out.append(r)
    return out


def test_one_epoch_numpy2():
    (r,) = records(EPOCH3)
    assert (r.epoch, r.lr, r.train_loss, r.val_loss, r.epoch_time) == (3, 0.00536, -0.4443, -0.4862, 24.49)
    assert r.dice == [0.9623, 0.9225, 0.0]


def test_dice_reprs():
    assert parse_dice("0.9623, 0.9225, 0.0") == [0.9623, 0.9225, 0.0]               # numpy 1
    assert parse_dice("np.float64(0.5), np.float32(nan)")[0] == 0.5
    assert math.isnan(parse_dice("np.float64(0.5), np.float32(nan)")[1])
    assert parse_dice("nan, 0.1")[1] == 0.1
    assert parse_dice("np.float32(0.1), garbage") is None


def test_foreign_and_partial_lines_are_ignored():
    assert parse_line("WARNING: some library warning") is None
    assert parse_line("2026-11-25 22:55:43.190388: Pseudo dice [np.float32(0.96") is None
    assert parse_line("2026-11-25 22:55:43: Epoch 12") == ("epoch", 12)  # no microseconds
    assert parse_line("2026-11-25 22:55:43.1: Training done.") == ("done", None)
    assert parse_line("2026-11-25 22:55:43.1: Mean Validation Dice:  0.634") == ("final_dice", 0.634)


def nnunet_ema(mfds):
    """nnUNetLogger.log's recurrence, written out independently."""
    ema = []
    for i, v in enumerate(mfds):
        ema.append(v if i == 0 else ema[i - 1] * 0.9 + 0.1 * v)
    return ema


def mk(epoch, dice):
    from supervisor.core.training_log import EpochRecord
    return EpochRecord(epoch=epoch, dice=list(dice))


def test_ema_matches_nnunet_recurrence_with_nanmean():
    dices = [[0.2, 0.4, math.nan], [0.3, 0.5, 0.0], [0.6, 0.7, 0.1], [0.8, 0.9, 0.2]]
    h = History()
    got = [h.add(mk(e, d)).ema for e, d in enumerate(dices)]
    want = nnunet_ema([(0.2 + 0.4) / 2, 0.8 / 3, 1.4 / 3, 1.9 / 3])
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, want))
    assert h.best_ema() == max(want)


def test_rewind_drops_the_future_and_recomputes_from_the_checkpoint_lineage():
    h = History()
    for e in range(6):
        h.add(mk(e, [0.1 * e, 0.1 * e]))
    # --c from checkpoint_best of epoch 2: training continues at 3 with different results
    r = h.add(mk(3, [0.9, 0.9]))
    assert sorted(h.records) == [0, 1, 2, 3]
    assert abs(r.ema - (0.9 * h.records[2].ema + 0.1 * 0.9)) < 1e-12


def test_all_nan_epoch_gives_nan_ema():
    h = History()
    r = h.add(mk(0, [math.nan, math.nan]))
    assert math.isnan(r.mean_fg_dice) and math.isnan(r.ema)
    assert h.best_ema() is None


def test_follower_reads_files_in_time_order_and_waits_for_newlines(tmp_path):
    # unpadded month/day: a string sort would put 2026_11_10 before 2026_11_9
    a = tmp_path / "training_log_2026_11_9_23_00_00.txt"
    b = tmp_path / "training_log_2026_11_10_01_00_00.txt"
    a.write_text("x: Epoch 0\n")
    b.write_text("x: Epoch 1\nx: Epoch 2")  # last line still being written
    f = LogFollower(tmp_path)
    assert [ln for _, ln in f.poll()] == ["x: Epoch 0", "x: Epoch 1"]
    assert f.poll() == []
    with open(b, "a") as fh:
        fh.write("\nx: Epoch 3\n")
    assert [ln for _, ln in f.poll()] == ["x: Epoch 2", "x: Epoch 3"]
    assert f.files()[-1] == b


def test_a_log_created_within_the_same_folder_mtime_is_still_found(tmp_path):
    """The folder is listed again only when its mtime moves (a stat per poll, not a glob), or every
    RELIST_EVERY polls: a file created within the same mtime tick is found all the same."""
    import os
    (tmp_path / "training_log_2026_1_1_00_00_00.txt").write_text("2026-01-01 00:00:00.000000: Epoch 0\n")
    f = LogFollower(tmp_path)
    assert [line for _n, line in f.poll()][0].endswith("Epoch 0")
    st = tmp_path.stat()
    (tmp_path / "training_log_2026_1_1_00_00_09.txt").write_text("2026-01-01 00:00:09.000000: Epoch 1\n")
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if created in the same tick
    seen = []
    for _ in range(LogFollower.RELIST_EVERY):
        seen += [line for _n, line in f.poll()]
    assert [s[-7:] for s in seen] == ["Epoch 1"]
