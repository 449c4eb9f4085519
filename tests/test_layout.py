"""The package's shape: no import cycle between siso's modules (lazy imports inside functions
included), and the public names the README shows still where it says."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "siso"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the siso modules it imports, at the top or inside functions."""
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                candidates = [module, *(f"{module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_siso_has_no_import_cycle():
    graph = import_graph()
    assert {"siso.cli", "siso.cli.generate", "siso.editing.task", "siso.session", "siso.eval.runner"} <= set(graph)
    # __main__ runs the entry point and reference renders it: the two modules that may import it
    commands = [m for m in graph if m.startswith("siso.cli.") and m not in ("siso.cli.__main__", "siso.cli.reference")]
    assert "siso.cli" not in set().union(*(graph[m] for m in commands))
    assert cycles(graph) == []


def private_imports() -> list[str]:
    """``from siso... import _name`` anywhere in siso: a module reaching into another's private names."""
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("siso")):
                found += [f"{path.relative_to(SRC)}: {alias.name}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    assert private_imports() == []


def test_the_entry_point_imports_the_commands():
    import siso.cli

    names = {command.name for command in siso.cli.app.registered_commands}
    assert names == {"generate", "render", "convert-ir", "app", "bench", "edit", "push"}


def test_the_readmes_python_names_are_sisos_own():
    """Every ``siso.NAME`` the README shows is exported, and is the object defined in siso's own module
    (not a stand-in): the lazy exports resolve to the real function or class."""
    import importlib
    import re

    import siso

    readme = (SRC.parents[1] / "README.md").read_text()
    names = sorted(set(re.findall(r"\bsiso\.([A-Za-z_]\w*)\(", readme)))
    assert {"generate", "edit", "render"} <= set(names)
    for name in names:
        assert name in siso.__all__, f"the README uses siso.{name}, which siso does not export"
        value = getattr(siso, name)
        assert value.__module__.startswith("siso."), name
        assert getattr(importlib.import_module(value.__module__), name) is value, name
    for name in siso.__all__:  # every export resolves
        assert getattr(siso, name).__module__.startswith("siso."), name


def test_no_dead_code():
    """vulture (configured in pyproject.toml: what libraries call is listed there) finds nothing unused."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-m", "vulture"], cwd=SRC.parents[1], capture_output=True, text=True,
                           timeout=120)
    assert found.returncode == 0 and not found.stdout.strip(), found.stdout + found.stderr
