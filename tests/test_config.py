"""config.toml validation: every problem named with file, key and expectation; exit 2 from the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.loader import ConfigError, load

REPO = Path(__file__).parent.parent
GOOD = """
[training]
dataset = "Dataset001_CardiacSeg"
[paths]
preprocessed = "pre"
results = "/abs/results"
"""


def write(tmp_path, text):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_example_config_in_repo_is_valid():
    cfg = load(REPO / "config.toml", env={})
    assert cfg.training.dataset == "Dataset001_CardiacSeg" and cfg.target.ema_dice == 0.70


def test_defaults_and_relative_paths(tmp_path):
    cfg = load(write(tmp_path, GOOD), env={})
    assert cfg.training.command == ("cardiacseg-train-nnunet",)
    assert cfg.paths.preprocessed == tmp_path / "pre"          # relative to the config file
    assert str(cfg.paths.results) == "/abs/results"
    assert cfg.paths.state_dir == tmp_path / "state"
    assert cfg.target.ema_dice is None and cfg.restart.max_restarts == 10


def test_paths_fall_back_to_nnunet_environment(tmp_path):
    cfg = load(write(tmp_path, '[training]\ndataset = "Dataset001_X"\n'),
               env={"nnUNet_preprocessed": "/p", "nnUNet_results": "/r", "STATE_DIRECTORY": "/var/lib/x"})
    assert (str(cfg.paths.preprocessed), str(cfg.paths.results), str(cfg.paths.state_dir)) == ("/p", "/r", "/var/lib/x")


@pytest.mark.parametrize("extra,needle", [
    ("[trainng]\nx = 1\n", "[trainng]: unknown section"),
    ("[restart]\nbackof_seconds = 3\n", "restart.backof_seconds: unknown key"),
    ("[restart]\nbackoff_seconds = -1\n", "restart.backoff_seconds: expected a finite number >= 0, got -1"),
    ("[restart]\nmax_restarts = \"ten\"\n", "restart.max_restarts: expected an integer, got 'ten'"),
    ("[restart]\nmax_restarts = true\n", "restart.max_restarts: expected an integer, got True"),
    ("[target]\nema_dice = 1.5\n", "target.ema_dice: expected a number in (0, 1], got 1.5"),
    ("[target]\nema_dice = 0\n", "target.ema_dice: expected a number in (0, 1], got 0"),
    ("[training.x]\n", "unknown key"),
    ("[environment]\nCUDA_VISIBLE_DEVICES = 0\n", "environment.CUDA_VISIBLE_DEVICES: expected a string"),
    ("[restart]\nbackoff_seconds = 100\nbackoff_max_seconds = 10\n", "restart.backoff_max_seconds: expected >="),
])
def test_bad_values_are_named(tmp_path, extra, needle):
    text = GOOD.replace("[paths]", "command = [\"nnUNetv2_train\"]\n[paths]") + extra
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text), env={})
    assert needle in str(e.value) and str(tmp_path / "config.toml") in str(e.value)


def test_shell_string_command_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"training.command: expected a list"):
        load(write(tmp_path, GOOD.replace("[paths]", 'command = "nnUNetv2_train 1 3d 0"\n[paths]')), env={})


def test_all_problems_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, "[restart]\nmax_restarts = -1\n[target]\nema_dice = 2.0\n"), env={})
    msg = str(e.value)
    for key in ("training.dataset", "paths.preprocessed", "paths.results", "restart.max_restarts",
                "target.ema_dice"):
        assert key in msg


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[training\n"), env={})
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize("cmd", ["run", "status", "check"])
def test_cli_exit_2_without_traceback(tmp_path, cmd):
    p = write(tmp_path, GOOD + "[target]\nema_dice = 7\n")
    r = subprocess.run([sys.executable, "-m", "supervisor", cmd, "--config", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "target.ema_dice" in r.stderr and str(p) in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "state").exists()  # nothing was started or created


def test_one_fold_parser_takes_slurms_ranges_and_refuses_repeats():
    """run --fold, slurm-script --folds and pack --folds all use config.schema.parse_folds."""
    import pytest
    from supervisor.commands import pack
    from supervisor.commands.cli import build_parser
    from supervisor.config.folds import parse_fold, parse_folds
    assert parse_folds("0-4") == [0, 1, 2, 3, 4]
    assert parse_folds("1-3,5") == [1, 2, 3, 5] and parse_folds(" 0 , 2 ") == [0, 2]
    assert parse_folds("all") == ["all"] and parse_fold("3") == 3
    for bad, why in (("0,0", "given twice"), ("0-2,1", "given twice"), ("4-1", "backwards"), ("x", "expected"),
                     ("0;1", "expected"), ("", "expected"), ("1000", "expected"), ("0-4", "one fold")):
        with pytest.raises(ValueError, match=why):
            parse_fold(bad) if why == "one fold" else parse_folds(bad)
    assert pack.parse_folds("0-1") == [0, 1]
    with pytest.raises(pack.PackError, match="--folds: fold 1 given twice"):
        pack.parse_folds("1,1")
    assert build_parser().parse_args(["run", "--config", "c", "--fold", "2"]).fold == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--config", "c", "--fold", "0-4"])


def test_queue_folds_take_slurms_range_syntax_too(tmp_path):
    import pytest
    from supervisor.config.loader import ConfigError, parse
    base = {"training": {"dataset": "D"}, "paths": {"preprocessed": "/p", "results": "/r"}}
    cfg = parse({**base, "queue": {"folds": "0-2,4"}}, tmp_path / "c.toml", env={})
    assert cfg.queue.folds == (0, 1, 2, 4)
    assert parse({**base, "queue": {"folds": [0, 1]}}, tmp_path / "c.toml", env={}).queue.folds == (0, 1)
    with pytest.raises(ConfigError, match=r'queue.folds: expected folds as a list, or a string like "0-4" '
                                          r'\(fold 1 given twice'):
        parse({**base, "queue": {"folds": "0-2,1"}}, tmp_path / "c.toml", env={})


@pytest.mark.parametrize("cmd", ["run", "status", "check"])
def test_a_byte_order_mark_gets_a_clear_message(tmp_path, cmd):
    """Windows editors may save config.toml with a UTF-8 BOM, which TOML parsers refuse at "line 1"."""
    p = write(tmp_path, GOOD)
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    r = subprocess.run([sys.executable, "-m", "supervisor", cmd, "--config", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert str(p) in r.stderr and "byte order mark" in r.stderr and "without BOM" in r.stderr
