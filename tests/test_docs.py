"""One declaration per fact: the README's tables and the example config.toml are checked against the code."""
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from supervisor.config import LIVE, RESTART, iter_keys, load, markdown_table, reload_kind
from supervisor.events import exit_code_table

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()
# keys the example sets to a job's own value on purpose; every other active key must show the default
JOB_SPECIFIC = {"training.dataset", "training.configuration", "training.expected_epochs", "paths.raw",
                "paths.preprocessed", "paths.results", "target.ema_dice"}


def test_readme_config_table_is_generated_from_the_declarations():
    assert markdown_table() in README, "run `python -m supervisor.config` and paste the table into README.md"


def test_readme_exit_code_table_is_generated_from_the_enum():
    assert exit_code_table() in README


def test_example_config_documents_every_key_with_its_default():
    text = (REPO / "config.toml").read_text()
    active = tomllib.loads(text)
    sections = {}
    for m in re.finditer(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M):
        sections[m.group(1)] = m.group(2)
    for section, name, f in iter_keys():
        body = sections.get(section, "")
        assert re.search(rf"^#? ?{name} = ", body, re.M), f"{section}.{name} missing from config.toml"
        if name in active.get(section, {}) and f"{section}.{name}" not in JOB_SPECIFIC:
            v = active[section][name]
            want = list(f.default) if isinstance(f.default, tuple) else f.default
            assert v == want, f"config.toml {section}.{name} = {v!r}, but the default is {want!r}"
    cfg = load(REPO / "config.toml", env={})
    assert cfg.thermal.enabled is True  # device cuda: the guard follows the device


def test_every_key_has_a_reload_kind_and_a_doc():
    for section, name, f in iter_keys():
        assert f.metadata["doc"], f"{section}.{name}"
        assert reload_kind(f"{section}.{name}") in (LIVE, RESTART, "next_attempt")
    assert reload_kind("environment") == "next_attempt"
