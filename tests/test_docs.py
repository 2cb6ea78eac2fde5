"""One declaration per fact: docs/ is generated from the code where it can be (and checked here), the
example config.toml is checked against the schema, and the README stays a front page whose links work."""
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from supervisor.commands import docs
from supervisor.config.loader import LIVE, RESTART, iter_keys, load, markdown_table, reload_kind
from supervisor.core import policy
from supervisor.core.exit_codes import exit_code_table

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()
# keys the example sets to a job's own value on purpose; every other active key must show the default
JOB_SPECIFIC = {"training.dataset", "training.configuration", "training.expected_epochs", "paths.raw",
                "paths.preprocessed", "paths.results", "target.ema_dice"}


def test_generated_blocks_in_docs_are_current():
    assert docs.stale() == [], "run `make docs`"
    pages = {p.name: p.read_text() for p in docs.pages()}
    assert markdown_table() in pages["configuration.md"]
    assert exit_code_table() in pages["service.md"]
    assert policy.markdown() in pages["how-it-decides.md"]
    used = {m for text in pages.values() for m in re.findall(r"<!-- generated: ([\w-]+) -->", text)}
    assert set(docs.BLOCKS) <= used, f"blocks nobody shows: {set(docs.BLOCKS) - used}"


def test_readme_is_a_front_page_and_every_link_resolves():
    assert len(README.splitlines()) <= 220
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+\.(?:md|png|toml|service))(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", README))
    assert linked == {p.name for p in (REPO / "docs").glob("*.md")}, "the README lists every docs page"


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
