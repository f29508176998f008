"""The layout's rules, read from the source: who may import whom, no cycles, nothing hidden.

protocol (the arrays) is at the bottom and imports nothing of ours; services (vLLM engines) and
trainer (the learner) import protocol only, never each other; orchestrator composes them; build
(model builders) sits on top and may use a recipe; only orchestrator.run, the command, runs the
builders before a recipe. Imports of our own modules stand at the top of a file, so none can hide
a cycle inside a function.
"""
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "services", "trainer", "orchestrator", "build")
OURS = PACKAGES + ("bench", "tests")
ALLOWED = {
    "protocol": {"protocol"},
    "services": {"protocol", "services"},
    "trainer": {"protocol", "trainer"},
    "orchestrator": {"protocol", "services", "trainer", "orchestrator"},
    "build": {"protocol", "services", "trainer", "orchestrator", "build"},
}
COMMAND = "orchestrator.run"  # may also import build: it runs the builders before the recipe
PROTOCOL_THIRD_PARTY = {"numpy", "safetensors"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module, at the top level of the file) for every import in ``path``; a name
    imported from a package resolves to its submodule when there is one."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in known else node.module, id(node) in top))
    return found


def our_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _ in imports(path, known) if m.split(".")[0] in OURS} for name, path in known.items()}


def test_every_import_goes_down_the_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        package = name.split(".")[0]
        for imported, at_top in imports(path, known):
            target = imported.split(".")[0]
            if target not in OURS:
                continue
            allowed = ALLOWED[package] | ({"build"} if name == COMMAND else set())
            if target not in allowed:
                wrong.append(f"{name} imports {imported}")
            if not at_top:
                wrong.append(f"{name} imports {imported} inside a function")
    assert not wrong, "\n".join(wrong)


def test_protocol_imports_numpy_and_safetensors_only():
    known = modules()
    used = {imported.split(".")[0] for name, path in known.items() if name.startswith("protocol")
            for imported, _ in imports(path, known)}
    outside = used - set(sys.stdlib_module_names) - {"protocol", "__future__"}
    assert outside <= PROTOCOL_THIRD_PARTY, outside


def test_no_import_cycles():
    graph = our_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_wrong_import(tmp_path):
    """The rules fail where they should: a services module importing trainer is caught."""
    known = modules()
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\n\n\ndef f():\n    from trainer import checkpoint\n")
    found = imports(bad, known)
    assert ("trainer.checkpoint", False) in found and ("numpy", True) in found
    assert "trainer" not in ALLOWED["services"]


def test_the_independent_rollout_reference_imports_nothing_it_checks():
    """tests/reference_rollout.py is the yardstick for switchkd's rollouts: were it to import the
    policies or the divergences it checks, a wrong rule would agree with itself."""
    tree = ast.parse((REPO / "tests" / "reference_rollout.py").read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in names} & set(OURS), sorted(names)
