"""The package's shape: modules that import each other in a cycle, or grow past one concept, are refused."""
import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent / "surgery"
MAX_LINES = 400
# Verification's modules become one package in a later part of #26; until then they may be long and
# plan -> calibration -> verify -> plan stays a cycle.
VERIFICATION = ("surgery.verify", "surgery.runner", "surgery.gradient_flow", "surgery.plan", "surgery.calibration")


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph() -> nx.DiGraph:
    """Every import between surgery's modules, at module level or inside functions and TYPE_CHECKING blocks.

    Importing `a.b.c` also runs the packages `a` and `a.b`: an edge to each that does not hold the importer."""
    mods = modules()
    graph = nx.DiGraph()
    for name, (path, package) in mods.items():
        here = name.split(".") if package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    dest = ".".join(parts[:i])
                    inside = name == dest or name.startswith(dest + ".")
                    if dest in mods and not inside:
                        graph.add_edge(name, dest)
    return graph


def in_verification(module: str) -> bool:
    return any(module == v or module.startswith(v + ".") for v in VERIFICATION)


def test_no_module_imports_itself_through_others_outside_verification():
    cycles = [c for c in nx.simple_cycles(import_graph()) if not all(in_verification(m) for m in c)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_every_module_is_at_most_400_lines_and_says_its_job():
    for name, (path, _) in modules().items():
        lines = path.read_text().splitlines()
        if not in_verification(name):
            assert len(lines) <= MAX_LINES, f"{path.relative_to(ROOT.parent)} has {len(lines)} lines; split it by concept"
        if len(lines) > 5:
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT.parent)} has no docstring"
