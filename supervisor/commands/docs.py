"""`python -m supervisor.commands.docs [--check]` (`make docs`): the parts of docs/ generated from the code.

How it works: a page marks a generated block with `<!-- generated: NAME -->` ... `<!-- end: NAME -->`;
BLOCKS maps each NAME to the function that renders it from its one declaration (the config schema, the
ExitCode enum, the policy's table, the queue's table, the package tree). Without --check the blocks are
rewritten in place; with --check nothing is written and the exit status is 1 when a page is stale
(tests/test_docs.py runs the same comparison).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PKG = REPO / "supervisor"


def config_table() -> str:
    from supervisor.config.loader import markdown_table
    return markdown_table()


def exit_codes() -> str:
    from supervisor.core.exit_codes import exit_code_table
    return exit_code_table()


def transition_table() -> str:
    from supervisor.core import policy
    return policy.markdown()


def table_size() -> str:
    from supervisor.core import policy
    from supervisor.core.events import EVENTS
    from supervisor.core.record import State
    rules, ignored = policy.counts()
    return (f"{len(State)} states x {len(EVENTS)} events = {len(State) * len(EVENTS)} pairs: {rules} rules, "
            f"{ignored} explicitly ignored.")


def queue_table() -> str:
    from supervisor.core import queue_policy as qp
    rows = ["| queue state | event | decision |", "| --- | --- | --- |"]
    for (st, et), e in qp.QUEUE_TABLE.items():
        what = f"ignored: {e.why}" if isinstance(e, qp.QIgnored) else " ".join(e.__doc__.split())
        rows.append(f"| {st.value} | {et.__name__} | {what} |")
    return "\n".join(rows)


def package_tree() -> str:
    """Each layer and its modules, each with the first line of its docstring (tests/test_layout.py keeps the
    layers honest). Line counts are left out on purpose: they would make every edit a docs change."""
    import ast
    lines = ["```"]
    for pkg in ("core", "config", "integrations", "daemon", "commands", "trainer"):
        lines.append(f"supervisor/{pkg}/")
        for p in sorted((PKG / pkg).glob("*.py")):
            if p.name != "__init__.py":
                doc = (ast.get_docstring(ast.parse(p.read_text())) or "").strip().splitlines()
                first = doc[0] if doc else ""
                lines.append(f"    {p.name:<22} {first[:88]}")
    lines.append("```")
    return "\n".join(lines)


BLOCKS = {"config-table": config_table, "exit-codes": exit_codes, "transition-table": transition_table,
          "table-size": table_size, "queue-table": queue_table, "package-tree": package_tree}
_BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)


def render(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group(2)]() + "\n" + m.group(4), text)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def stale() -> list[str]:
    return [p.name for p in pages() if render(p.read_text()) != p.read_text()]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        for name in bad:
            print(f"{name}: generated blocks are stale (run `make docs`)", file=sys.stderr)
        return 1 if bad else 0
    for p in pages():
        text = p.read_text()
        if render(text) != text:
            p.write_text(render(text))
            print(f"updated {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
