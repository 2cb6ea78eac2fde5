"""Hostile config.toml: inf durations, `=` / NUL in [environment] and extra_args, and a fuzz of the loader.

Whatever the document, `load` returns a Config or raises ConfigError naming the file: never another
exception, so `run`, `check` and `status` never print a traceback for bad input.
"""
import datetime
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.loader import SECTIONS, Config, ConfigError, load, parse

REPO = Path(__file__).parent.parent
GOOD = '[training]\ndataset = "Dataset001_X"\n[paths]\npreprocessed = "pre"\nresults = "res"\n'


def write(tmp_path, text, name="config.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def with_keys(**sections):
    """GOOD plus [section] key = raw-TOML-value lines (sections may repeat GOOD's: merged)."""
    text = GOOD
    for sec, body in sections.items():
        lines = "".join(f"{k} = {v}\n" for k, v in body.items())
        header = f"[{sec}]\n"
        text = text.replace(header, header + lines) if header in text else text + header + lines
    return text


@pytest.mark.parametrize("section,key_", [("stop", "timeout_seconds"), ("stop", "checkpoint_wait_seconds"),
                                          ("restart", "backoff_seconds")])
@pytest.mark.parametrize("value", ["inf", "+inf", "-inf", "nan"])
def test_non_finite_durations_are_refused_with_the_key_named(tmp_path, section, key_, value):
    p = write(tmp_path, with_keys(**{section: {key_: value}}))
    with pytest.raises(ConfigError) as e:
        load(p, env={})
    assert f"{section}.{key_}: expected a finite number" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("env_line,needle", [
    ('"A=B" = "x"', "environment.'A=B': expected a variable name without '='"),
    ('"" = "x"', "environment.'': expected a variable name"),
    ('"A\\u0000B" = "x"', "environment.'A\\x00B': expected a variable name"),
    ('CUDA_VISIBLE_DEVICES = "0\\u0000rm"', "environment.CUDA_VISIBLE_DEVICES: expected a string without NUL"),
])
def test_environment_names_with_equals_and_values_with_nul_are_refused(tmp_path, env_line, needle):
    p = write(tmp_path, GOOD + "[environment]\n" + env_line + "\n")
    with pytest.raises(ConfigError) as e:
        load(p, env={})
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("key_,value", [("extra_args", '["--npz", "a\\u0000b"]'),
                                        ("command", '["nnUNetv2_train", "x\\u0000"]'),
                                        ("dataset", '"Dataset\\u0000"')])
def test_nul_bytes_in_training_strings_are_refused(tmp_path, key_, value):
    text = GOOD.replace('dataset = "Dataset001_X"\n', "") if key_ == "dataset" else GOOD
    p = write(tmp_path, with_keys(training={key_: value}) if key_ != "dataset" else
              text.replace("[training]\n", f"[training]\ndataset = {value}\n"))
    with pytest.raises(ConfigError) as e:
        load(p, env={})
    assert f"training.{key_}: expected" in str(e.value) and "NUL" in str(e.value)


@pytest.mark.parametrize("text,needle", [
    (with_keys(stop={"timeout_seconds": "inf"}), "stop.timeout_seconds"),
    (GOOD + '[environment]\n"A=B" = "x"\n', "environment.'A=B'"),
    (with_keys(training={"extra_args": '["a\\u0000"]'}), "training.extra_args"),
])
def test_check_exits_2_naming_the_key_without_traceback(tmp_path, text, needle):
    p = write(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and str(p) in r.stderr and "Traceback" not in r.stderr + r.stdout


# ---- fuzz: random documents, fixed seed ------------------------------------------------------------------
KNOWN = {s: [f.name for f in __import__("dataclasses").fields(cls)] for s, cls in SECTIONS.items()}
HOSTILE_STRINGS = ["", " ", "\0", "a\0b", "=", "A=B", "~", "~nobody/x", "../../etc", "/", "x" * 5000,
                   "\u00b2", "\U0001F600", "\\", '"', "nan", "inf", "cpu", "cuda", "all", "3d_fullres",
                   "multiply", "command", "1", "-1"]
HOSTILE_NUMBERS = [0, 1, -1, 2**63 - 1, -2**63, 2**64, 10**100, 0.0, -0.0, 0.5, 1.0, 1.5, 1e308, -1e308,
                   5e-324, float("inf"), float("-inf"), float("nan"), True, False]
OTHER = [datetime.datetime(1979, 5, 27, 7, 32), datetime.date(1979, 5, 27), datetime.time(7, 32)]


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 3 or r < 0.35:
        return rng.choice(HOSTILE_NUMBERS)
    if r < 0.65:
        return rng.choice(HOSTILE_STRINGS + ["".join(rng.choice(string.printable) for _ in range(8))])
    if r < 0.7:
        return rng.choice(OTHER)
    if r < 0.85:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(HOSTILE_STRINGS + ["x", "batch_size"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def random_document(rng: random.Random) -> dict:
    if rng.random() < 0.5:  # a valid document with one hostile value in a known key
        section = rng.choice(list(KNOWN))
        doc = {"training": {"dataset": "Dataset001_X"}}
        doc.setdefault(section, {})[rng.choice(KNOWN[section])] = random_value(rng)
        return doc
    doc = {}
    for _ in range(rng.randrange(1, 8)):
        r = rng.random()
        if r < 0.75:
            section = rng.choice(list(KNOWN))
            body = doc.setdefault(section, {})
            if isinstance(body, dict):
                name = rng.choice(KNOWN[section] + ["unknown_key", "\0", ""])
                body[name] = random_value(rng)
        elif r < 0.85:
            doc["environment"] = {rng.choice(HOSTILE_STRINGS): random_value(rng) for _ in range(3)}
        else:
            doc[rng.choice(HOSTILE_STRINGS + list(KNOWN))] = random_value(rng)
    return doc


def test_fuzz_parse_gives_a_config_or_a_config_error(tmp_path):
    rng = random.Random(20261126)
    outcomes = {Config: 0, ConfigError: 0}
    for i in range(3000):
        doc = random_document(rng)
        try:
            result = parse(doc, tmp_path / "config.toml", env={"nnUNet_preprocessed": "/p",
                                                              "nnUNet_results": "/r"})
        except ConfigError as e:
            assert str(tmp_path / "config.toml") in str(e), (i, doc)
            outcomes[ConfigError] += 1
        except Exception as e:  # pragma: no cover - the failure this test exists for
            raise AssertionError(f"document {i} {doc!r} raised {type(e).__name__}: {e}") from e
        else:
            assert isinstance(result, Config)
            outcomes[Config] += 1
    assert outcomes[Config] > 50 and outcomes[ConfigError] > 50  # both paths really exercised


TOML_FRAGMENTS = ["[training]", "[paths]", "[stop]", "[environment]", "[[training]]", "[training.x]",
                  "dataset = 1", 'dataset = "Dataset001_X"', "timeout_seconds = inf", "fold = nan",
                  'preprocessed = "p"', 'results = "r"', "command = []", 'command = ["a", 1]',
                  "x = 99999999999999999999999", "x = 1979-05-27T07:32:00Z", 'x = """\n"""',
                  'a.b.c = 1', "x = {a = {b = {c = 1}}}", "x = [[[1]]]", "= 1", "x =", '"\\u0000" = 1',
                  'x = "\\u0000"', "\0", "\ufeff", "[", "]", "x = 'unterminated", "[ environment ]",
                  'max_restarts = -0', "max_restarts = 0x10", "ema_dice = 1e-400", "ema_dice = 1e400"]


def test_fuzz_load_of_random_text_gives_a_config_or_a_config_error(tmp_path):
    rng = random.Random(7)
    p = tmp_path / "config.toml"
    for i in range(1500):
        text = "\n".join(rng.choice(TOML_FRAGMENTS) for _ in range(rng.randrange(1, 12)))
        data = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data) + 1)] + bytes([rng.randrange(256)])
        p.write_bytes(data)
        try:
            load(p, env={})
        except ConfigError as e:
            assert str(p) in str(e)
        except Exception as e:  # pragma: no cover
            raise AssertionError(f"document {i} {data!r} raised {type(e).__name__}: {e}") from e


@pytest.mark.parametrize("text", ["x = " + "[" * 3000 + "]" * 3000,
                                  "x = " + "{a = " * 3000 + "1" + "}" * 3000])
def test_deeply_nested_documents_are_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError):
        load(write(tmp_path, text), env={})


def test_non_ascii_digit_gpu_index_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="thermal.gpus"):
        load(write(tmp_path, GOOD + '[thermal]\ngpus = ["\u00b2"]\n'), env={})
