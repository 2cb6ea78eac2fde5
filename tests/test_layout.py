"""The layout shows what runs where: no upward imports, the daemon never imports torch, no module shadows
the standard library (a script run from supervisor/ would import it instead: `import queue` broke torch)."""
import ast
import sys
from pathlib import Path

PKG = Path(__file__).parent.parent / "supervisor"
# lower layers never import higher ones
LAYERS = [
    {"schema", "classify", "rules", "logparse", "diagnose"},                     # pure rules and parsers
    {"events"},                                                                  # the vocabulary of decide
    {"sup", "transitions", "policy", "config", "reload", "statusline"},          # decisions, the config
    {"store", "job", "proc", "plans", "checkpoints", "gpu", "output", "attempt", "thermal", "sdnotify",
     "logs", "slurm", "others", "notify", "metrics", "plot", "sinks", "manifest", "profiling"},
    {"actions", "check", "jobqueue", "pack", "unpack"},                           # acting, preflight, master
    {"daemon"},                                                                   # the loop
    {"status", "install", "demo", "cli", "__main__", "__init__"},                 # commands
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out |= {a.name for a in node.names}
    return out


def test_every_daemon_module_has_a_layer():
    missing = {p.stem for p in PKG.glob("*.py")} - set(RANK)
    assert not missing, f"put {missing} into a layer of tests/test_layout.py"


def test_no_upward_imports():
    bad = []
    for p in PKG.glob("*.py"):
        for m in imports(p):
            if m in RANK and RANK[m] > RANK[p.stem]:
                bad.append(f"{p.stem} -> {m}")
    assert not bad, bad


def test_the_daemon_never_imports_torch_or_nnunetv2():
    for p in PKG.glob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                  and n.module and n.level == 0}
        assert not names & {"torch", "nnunetv2"}, p.name


def test_no_module_shadows_the_standard_library():
    for p in [*PKG.glob("*.py"), *PKG.glob("trainer/*.py")]:
        assert p.stem not in sys.stdlib_module_names, f"{p} shadows the standard library's {p.stem}"
