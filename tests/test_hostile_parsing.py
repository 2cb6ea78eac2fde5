"""The log parser against hostile input: bounded work per line and per poll, values checked where they enter.

The time bounds here are generous guards against quadratic blow-up (the old `\\d+\\.?\\d*` pattern needed
~3 s for one 8,000-digit line and ~40 s for 30,000 digits), not performance measurements.
"""
import math
import random
import time

from supervisor.core.training_log import (MAX_EPOCH, MAX_EPOCH_TIME_S, MAX_LINE_BYTES, EpochAssembler, History,
                                          parse_line, replay)
from supervisor.integrations.log_follower import MAX_POLL_BYTES, LogFollower

TS = "2026-11-25 22:55:43.190388: "
BOUND_S = 0.5


def epoch_lines(e, dice="np.float32(0.5), np.float32(0.6)", time_s="24.49"):
    return [f"{TS}Epoch {e}", f"{TS}Current learning rate: 0.00536", f"{TS}train_loss -0.4443",
            f"{TS}val_loss -0.4862", f"{TS}Pseudo dice [{dice}]", f"{TS}Epoch time: {time_s} s"]


def history_of(lines):
    return replay(("f", ln) for ln in lines)


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


# ---- item 1: no backtracking, bounded lines ------------------------------------------------------
def test_a_long_digit_run_under_the_line_cap_parses_in_linear_time():
    # within MAX_LINE_BYTES, so every pattern really runs over it
    for kind in ("train_loss ", "val_loss ", "Current learning rate: ", "Epoch time: ", "Pseudo dice ["):
        line = TS + kind + "1" * (MAX_LINE_BYTES - 100) + "x"
        ev, dt = timed(parse_line, line)
        assert ev is None and dt < BOUND_S, (kind, dt)


def test_the_30000_digit_line_of_the_issue_is_ignored_at_once():
    ev, dt = timed(parse_line, TS + "train_loss " + "1" * 30_000 + "x")
    assert ev is None and dt < BOUND_S
    # a well-formed but over-long value line is not one of nnU-Net's either
    assert parse_line("train_loss " + "1" * MAX_LINE_BYTES) is None
    assert parse_line("train_loss " + "1" * 50) == ("train_loss", float("1" * 50))


def test_digits_of_other_scripts_are_not_numbers():
    assert parse_line("Epoch \u0663") is None          # ARABIC-INDIC DIGIT THREE: int() would take it
    assert parse_line("train_loss \uff11.5") is None   # FULLWIDTH DIGIT ONE


def test_absurd_epoch_numbers_are_ignored():
    assert parse_line("Epoch 99999999999999999999") is None
    assert parse_line("Epoch " + "9" * 5000) is None   # int() of > 4300 digits raises ValueError
    assert parse_line(f"Epoch {MAX_EPOCH + 1}") is None
    assert parse_line(f"Epoch {MAX_EPOCH}") == ("epoch", MAX_EPOCH)


# ---- item 5: values checked where they enter ------------------------------------------------------
def test_dice_outside_0_1_leaves_the_epoch_without_dice_so_no_target_is_reached():
    # the issue's scenario: 5.0 / inf dice lines made `target_reached epoch=2 ema=0.96`
    lines = []
    for e, dice in enumerate(["np.float32(5.0), np.float32(5.0)", "inf, 0.9", "np.float32(-0.1), 0.9"]):
        lines += epoch_lines(e, dice)
    h = history_of(lines)
    assert sorted(h.records) == [0, 1, 2]  # the epochs still complete
    for r in h.ordered():
        assert r.dice == [] and math.isnan(r.ema)
    assert h.best_ema() is None


def test_nan_and_boundary_dice_are_legitimate():
    assert parse_line("Pseudo dice [np.float32(nan), np.float32(0.0), np.float32(1.0)]")[1][1:] == [0.0, 1.0]
    assert parse_line("Pseudo dice [1.0000001]") is None


def test_non_finite_or_absurd_epoch_time_completes_the_record_with_time_unknown():
    for bad in ("inf", "nan", "-1.0", "1e300", str(MAX_EPOCH_TIME_S * 2)):
        (r,) = history_of(epoch_lines(0, time_s=bad)).ordered()
        assert r.epoch_time is None and r.dice == [0.5, 0.6], bad


def test_losses_may_be_non_finite():
    assert math.isnan(parse_line("train_loss nan")[1])
    assert parse_line("train_loss -inf") == ("train_loss", -math.inf)
    assert parse_line("val_loss 1e999") == ("val_loss", math.inf)


def test_an_unreadable_epoch_makes_the_ema_unknown_instead_of_restarting_it():
    # epoch 1's lines are garbled, so no record 1; epoch 2 alone must not become the EMA
    lines = epoch_lines(0, "0.1, 0.1") + [TS + "Epoch 1", TS + "Epo\x00ch time: 3 s"] + epoch_lines(2, "0.99, 0.99")
    h = history_of(lines)
    assert sorted(h.records) == [0, 2]
    assert math.isnan(h.records[2].ema)
    assert abs(h.best_ema() - 0.1) < 1e-12


# ---- item 1: bounded work per poll ----------------------------------------------------------------
def test_poll_reads_at_most_the_budget_and_the_rest_on_the_next_call(tmp_path):
    log = tmp_path / "training_log_2026_11_25_22_55_43.txt"
    line = (TS + "train_loss -0.4443\n").encode()
    n = (3 * MAX_POLL_BYTES) // len(line) + 7
    log.write_bytes(line * n)
    f = LogFollower(tmp_path)
    got = []
    for _ in range(10):
        before = f.offsets.get(log.name, 0)
        batch = f.poll()
        assert f.offsets.get(log.name, 0) - before <= MAX_POLL_BYTES
        if not batch:
            break
        got += batch
    assert len(got) == n and f.offsets[log.name] == log.stat().st_size


def test_a_gigantic_line_without_newline_is_skipped_not_reread(tmp_path):
    log = tmp_path / "training_log_2026_11_25_22_55_43.txt"
    log.write_bytes(f"{TS}Epoch 4\n".encode() + b"1" * (2 * MAX_POLL_BYTES + 123))  # still being written
    f = LogFollower(tmp_path)
    assert [ln for _, ln in f.poll()] == [f"{TS}Epoch 4"]
    offsets = [f.offsets[log.name]]
    for _ in range(4):
        assert f.poll() == []
        offsets.append(f.offsets[log.name])
    assert offsets[-1] == log.stat().st_size          # consumed, not held or re-read
    assert all(b - a <= MAX_POLL_BYTES for a, b in zip(offsets, offsets[1:]))
    with open(log, "ab") as fh:                       # the rest of that line, then a real one
        fh.write(b"222x\n" + f"{TS}Epoch 5\n".encode())
    assert [ln for _, ln in f.poll()] == [f"{TS}Epoch 5"]


def test_a_short_partial_line_still_waits_for_its_newline(tmp_path):
    log = tmp_path / "training_log_2026_11_25_22_55_43.txt"
    log.write_bytes(f"{TS}Epoch 4\n{TS}Epoch ti".encode())
    f = LogFollower(tmp_path)
    assert len(f.poll()) == 1 and f.poll() == []
    with open(log, "ab") as fh:
        fh.write(b"me: 3.0 s\n")
    assert [parse_line(ln) for _, ln in f.poll()] == [("epoch_time", 3.0)]


def test_drain_replays_past_a_budget_spent_on_a_skipped_line(tmp_path):
    log = tmp_path / "training_log_2026_11_25_22_55_43.txt"
    body = b"9" * (MAX_POLL_BYTES + 5) + b"\n" + "\n".join(epoch_lines(0) + epoch_lines(1)).encode() + b"\n"
    log.write_bytes(body)
    h = replay(LogFollower(tmp_path).drain())
    assert sorted(h.records) == [0, 1]


# ---- fuzz ------------------------------------------------------------------------------------------
def adversarial_lines(rng: random.Random) -> list[bytes]:
    digits = "".join(rng.choice("0123456789") for _ in range(30_000))
    out = [
        (TS + "train_loss " + digits + "x").encode(),
        (TS + "train_loss " + "1" * (1 << 20)).encode(),             # a 1 MB line
        b"Pseudo dice [" + b", ".join([b"np.float32(0.5)"] * 100_000) + b"]",
        b"Pseudo dice [" + b", ".join([b"0.5"] * 400) + b"]",            # long but under the cap
        b"Pseudo dice [" + b"(" * 5000 + b"0.5" + b")" * 5000 + b"]",
        b"Pseudo dice [np.float32(np.float32(0.5))]",
        b"Epoch 99999999999999999999", b"Epoch -1", b"Epoch 1e3",
        b"Epoch time: 1e400 s", b"Epoch time: -0.0 s", b"Epoch time: " + b"9" * 5000 + b" s",
        b"train_loss \x00\x00\x00", b"\xff\xfe\xfdtrain_loss 1.0\xc3", b"Epoch \xd9\xa3",
        b"Current learning rate: " + b"1." + b"0" * 7000 + b"e" + b"9" * 500,
        b"val_loss " + b"-" * 5000 + b"1", b"Yayy! New best EMA pseudo Dice: " + b"e" * 8000,
        b"Mean Validation Dice: " + b" " * 8000 + b"0.5 x",
        b"\r\r\r", b"\x0b\x0c\x1c\x85", b"",
    ]
    alphabet = b"0123456789.eE+-naif ,()[]:\x00\xff\tEpoch timeds"
    for _ in range(300):
        n = rng.choice([1, 10, 100, 5000, 20_000])
        body = bytes(rng.choice(alphabet) for _ in range(n))
        prefix = rng.choice([b"", TS.encode(), b"Epoch ", b"Epoch time: ", b"Pseudo dice [", b"train_loss "])
        out.append(prefix + body)
    for e in range(5):  # real epochs interleaved, so the assembler has records to build
        out += [ln.encode() for ln in epoch_lines(e, rng.choice(["0.5, nan", "5.0, 0.1", "0.9, 0.8"]),
                                                  rng.choice(["12.5", "inf", "nan"]))]
    rng.shuffle(out)
    return out


def assert_sane(rec):
    assert 0 <= rec.epoch <= MAX_EPOCH
    assert all(math.isnan(d) or 0.0 <= d <= 1.0 for d in rec.dice)
    assert rec.epoch_time is None or (math.isfinite(rec.epoch_time) and 0 <= rec.epoch_time <= MAX_EPOCH_TIME_S)
    assert math.isnan(rec.ema) or 0.0 <= rec.ema <= 1.0


def test_fuzz_parse_assemble_history_and_follower(tmp_path):
    rng = random.Random(20261125)
    lines = adversarial_lines(rng)
    asm, h = EpochAssembler(), History()
    for raw in lines:
        text = raw.decode("utf-8", "replace")
        ev, dt = timed(parse_line, text)
        assert dt < BOUND_S, (raw[:80], dt)
        if ev is not None and (rec := asm.feed(ev)) is not None:
            assert_sane(h.add(rec))
    # the same bytes through a real training log file, written in uneven pieces
    log = tmp_path / "training_log_2026_11_25_22_55_43.txt"
    blob = b"\n".join(lines) + b"\n"
    f, h2, seen = LogFollower(tmp_path), History(), 0
    with open(log, "wb") as fh:
        pos = 0
        while pos < len(blob):
            step = rng.choice([1, 100, 5000, 300_000, 3 << 20])
            fh.write(blob[pos:pos + step])
            fh.flush()
            pos += step
            batch, dt = timed(f.poll)
            assert dt < 4 * BOUND_S  # at most MAX_POLL_BYTES of work
            seen += len(batch)
            replay(batch, h2)
    while batch := f.poll():
        seen += len(batch)
        replay(batch, h2)
    assert f.offsets[log.name] == log.stat().st_size
    for rec in h2.ordered():
        assert_sane(rec)
    # every line under the cap came through once; the over-long ones were skipped
    assert seen == sum(len(ln) <= MAX_LINE_BYTES for ln in lines)


def test_trainer_output_without_newlines_costs_constant_memory(tmp_path):
    """A trainer printing 64 MiB without a newline (then one): the supervisor keeps at most one cut line
    per stream, says once that it was cut, and the attempt log still has every byte."""
    from supervisor.daemon.trainer_output import TRUNCATED, TrainerOutput
    from supervisor.core.training_log import MAX_LINE_BYTES

    out = TrainerOutput(tmp_path / "a.log", reserve_bytes=0)
    chunk = b"x" * 65536
    got = []
    for _ in range(1024):
        got += out.feed("stdout", chunk)
        assert len(out.partial["stdout"]) <= MAX_LINE_BYTES
    got += out.feed("stdout", b"tail\nnext line\npart")
    got += out.end("stdout")
    out.close()
    assert [len(t) for _, t in got[:1]] == [MAX_LINE_BYTES + len(TRUNCATED)]
    assert [t for _, t in got[1:]] == ["next line", "part"]
    assert (tmp_path / "a.log").stat().st_size == 1024 * 65536 + len(b"tail\nnext line\npart")
    long_lines = TrainerOutput(tmp_path / "b.log", reserve_bytes=0).feed("stderr", b"y" * 20000 + b"\nok\n")
    assert [len(t) for _, t in long_lines] == [MAX_LINE_BYTES + len(TRUNCATED), 2]
