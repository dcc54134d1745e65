"""The package's shape: no import cycle, no module over 400 lines, every module says its job in a docstring.

The import graph is read from the source (ast): every import statement of a module, at module level, inside a
function or under `TYPE_CHECKING`, relative ones resolved, to the module of the package it loads.
"""
import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "surgery"
MAX_LINES = 400


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `root`."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports anywhere in its file: `from . import x` is module x where there is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path) -> nx.DiGraph:
    known = modules(root)
    g = nx.DiGraph()
    for name, path in known.items():
        g.add_node(name)
        g.add_edges_from((name, t) for t in imported(name, path, known))
    return g


def cycles(g: nx.DiGraph) -> list[set[str]]:
    return [set(c) for c in nx.strongly_connected_components(g) if len(c) > 1 or g.has_edge(*[*c] * 2)]


def test_the_import_graph_of_the_package_has_no_cycle():
    g = import_graph(ROOT)
    assert g.has_edge("surgery.plan", "surgery.verify.schedule")  # a function-level import, relative
    assert g.has_edge("surgery.verify.run", "surgery.verify.rules") and g.has_edge("surgery.cli", "surgery.runtime.memory")
    found = cycles(g)
    assert found == [], "import cycles"


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    g = import_graph(pkg)
    assert cycles(g) == [{"pkg.a", "pkg.sub.b"}] and g.has_edge("pkg.c", "pkg.a")


def test_no_module_is_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in ROOT.rglob("*.py") if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_says_its_job_in_a_docstring(path):
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"


def test_the_schedule_imports_without_torch():
    """`surgery plan` states what verification will run from the schedule; computing it needs no torch."""
    import subprocess
    import sys

    probe = "import sys\nimport surgery.verify.schedule\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
