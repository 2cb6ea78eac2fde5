"""The folder tree shows the architecture, and the imports keep to it.

supervisor/ holds one sub-package per layer; a module imports only from its own layer or a lower one:

    core          pure decisions and parsers: events, the state record, the policy and its table
    config        config.toml's declarations, loading and reload; the nnU-Net job the config names
    integrations  adapters to the world: files, processes, NVML, systemd, SLURM, notifications, metrics
    daemon        the loop that waits, reports events, asks the core and carries out its actions
    commands      the command line: run, status, check, pack, unpack, install-unit, demo
    trainer       code that runs inside the trainer process (torch, nnU-Net); nothing else imports it

Also: the core does no I/O (no module of it imports the standard library's I/O, process or clock
modules), the daemon never imports torch or nnunetv2, no module shadows the standard library (a script
run from its folder would import it instead: `import queue` broke torch), and every module stays a
readable size.
"""
import ast
import sys
from pathlib import Path

PKG = Path(__file__).parent.parent / "supervisor"
LAYERS = ["core", "config", "integrations", "daemon", "commands"]
RANK = {p: i for i, p in enumerate(LAYERS)}
TOP_LEVEL = {"__init__", "__main__"}
# what a pure module may not touch: files, processes, sockets, clocks, threads, the network, hardware
IMPURE = {"os", "io", "subprocess", "socket", "selectors", "shutil", "time", "threading", "urllib", "http",
          "psutil", "pynvml", "pathlib", "tempfile", "fcntl", "asyncio", "multiprocessing"}
MAX_LINES = 400


def modules():
    return [p for p in PKG.rglob("*.py") if "trainer" not in p.relative_to(PKG).parts]


def layer_of(path: Path) -> str | None:
    parts = path.relative_to(PKG).parts
    return parts[0] if len(parts) > 1 else None


def supervisor_imports(path: Path) -> set[str]:
    """The sub-packages of supervisor that a module imports from."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use supervisor.<layer>.<module>)"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "supervisor" and len(parts) > 1:
                out.add(parts[1])
    return out


def stdlib_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_every_module_lives_in_a_layer_package():
    loose = {p.stem for p in PKG.glob("*.py")} - TOP_LEVEL
    assert not loose, f"move {loose} into one of {LAYERS}"
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {*LAYERS, "trainer"}


def test_no_upward_imports_between_layers():
    bad = []
    for p in modules():
        own = layer_of(p)
        for dep in supervisor_imports(p):
            if own is None:
                continue
            if dep == "trainer" and own != "commands":
                bad.append(f"{p.relative_to(PKG)} -> trainer")
            elif dep in RANK and RANK[dep] > RANK[own]:
                bad.append(f"{p.relative_to(PKG)} -> {dep}")
    assert not bad, bad


def test_the_core_does_no_io():
    for p in (PKG / "core").glob("*.py"):
        bad = stdlib_imports(p) & IMPURE
        assert not bad, f"{p.name} imports {bad}: the core decides, adapters measure"


def test_the_daemon_never_imports_torch_or_nnunetv2():
    for p in modules():
        assert not stdlib_imports(p) & {"torch", "nnunetv2"}, p.name


def test_no_module_shadows_the_standard_library():
    for p in PKG.rglob("*.py"):
        assert p.stem not in sys.stdlib_module_names, f"{p} shadows the standard library's {p.stem}"


def test_every_module_stays_readable():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"
