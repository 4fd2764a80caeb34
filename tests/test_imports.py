"""Imports among lowvram's modules run one way: no cycle, counting the imports inside functions
(the lazy ones) as well as those at the top of a module.

An import names the module it reads: ``from lowvram.memory.plan import plan`` is an edge to
``lowvram.memory.plan``, ``from lowvram.memory import Recipe`` one to the package's face
(``lowvram/memory/__init__.py``), ``from lowvram.verify import cli`` one to the submodule. Read
from the source with ``ast``: nothing is imported to find them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowvram

PACKAGE = Path(lowvram.__file__).parent


def module_files(package: Path) -> dict[str, Path]:
    """Every module under ``package``, by its dotted name (a package by its own name)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph(package: Path) -> dict[str, set[str]]:
    """For each module of ``package``, the modules of ``package`` it imports, anywhere in it."""
    files = module_files(package)

    def known(name: str) -> str | None:  # the module itself, or the package that holds the name
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package up
                    here = module.split(".")[: None if path.name == "__init__.py" else -1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                         for a in node.names]
            else:
                continue
            imported |= {t for t in map(known, names) if t is not None and t != module}
        graph[module] = imported
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_lowvram_imports_have_no_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 30 and "lowvram.verify.check" in graph  # the walk saw the package
    # the edges that once closed cycles, now one way
    assert "lowvram.verify.cli" in graph["lowvram.memory.cli"]
    assert "lowvram.verify.check" in graph["lowvram.verify.cli"]
    assert "lowvram.memory.plan" in graph["lowvram.verify.check"]
    assert "lowvram.checkpoints" not in graph["lowvram.outputdir"]
    assert "lowvram.failures" in graph["lowvram.checkpoints"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # relative, in a function
    (pkg / "c.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    import os\n")
    assert find_cycle(import_graph(pkg)) is None
