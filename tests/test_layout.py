"""The layout's import rules, read from the source (ast), so they hold as the code grows.

Packages, top to bottom; each imports only itself and those below it (ALLOWED):

    search.commands  ->  search.run  ->  search.results  ->  search.workers  ->  search.spec  ->  search.study
                     ->  search.engine, spaces, objectives (spaces and objectives import only the engine;
                         the engine imports nothing else of ours)

and no module imports another that imports it back, however far round (a circle).
Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("search", "spaces", "objectives")

BASE = ("search.engine", "spaces", "objectives")
# package -> the packages of ours it may import (prefixes of dotted module names); from the top down
ALLOWED = {
    "search.commands": ("search.commands", "search.run", "search.results", "search.workers", "search.spec",
                        "search.study", *BASE),
    "search.run": ("search.run", "search.results", "search.workers", "search.spec", "search.study", *BASE),
    "search.results": ("search.results", "search.study", *BASE),
    "search.workers": ("search.workers", "search.spec", *BASE),
    "search.spec": ("search.spec", "search.study", *BASE),
    "search.study": ("search.study", *BASE),
    "search.engine": ("search.engine",),
    "spaces": ("spaces", "search.engine"),
    "objectives": ("objectives", "search.engine"),
    "search": ("search",),  # search/__init__.py: a docstring, no imports of ours
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of ours in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from search import engine` imports search.engine: name each imported name as a module too
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in OURS]


def rule_for(module: str) -> tuple[str, tuple[str, ...]] | None:
    """The rule of the deepest package the module is in (search.engine's, not search's)."""
    for package, allowed in sorted(ALLOWED.items(), key=lambda item: -len(item[0])):
        if module == package or module.startswith(package + "."):
            return package, allowed
    return None


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def source_files() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_is_in_a_package_with_a_rule():
    """A new package under search/ needs its place in ALLOWED (and in search/__init__.py's list)."""
    modules = [module_name(p) for p in source_files()]
    assert [m for m in modules if m != "search" and rule_for(m) in (None, ("search", ("search",)))] == []


def test_every_package_imports_only_what_its_rule_allows():
    broken = []
    for path in source_files():
        package, allowed = rule_for(module_name(path))
        for line, imported in imported_modules(path):
            # `from search.engine import recipe` names search.engine.recipe; `from search import x`
            # names search.x, which is outside the engine unless x is `engine`
            if not within(imported, allowed):
                broken.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports {imported}")
    assert not broken, "import rules broken:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    "source, importer, ok",
    [
        ("from search.run.driver import run", "search/engine/x.py", False),
        ("from search import records", "search/engine/x.py", False),
        ("from search.engine import recipe", "search/engine/x.py", True),
        ("from .plan import Job", "search/engine/x.py", True),
        ("from ..runspec import RunSpec", "search/engine/x.py", False),
        ("def f():\n    import objectives.lmeval", "spaces/x.py", False),
        ("from search.engine.errors import UserError", "objectives/x.py", True),
        ("from search.results.export import write", "objectives/zoo/x.py", False),
        ("from spaces import build_space", "objectives/x.py", False),
        ("from search.run.driver import run", "search/results/x.py", False),
        ("from search.results import winner", "search/run/x.py", True),
        ("def f():\n    from search.commands import cli", "search/workers/x.py", False),
        ("from search.workers.worker_pool import WorkerPool", "search/study/x.py", False),
        ("from search.study import records", "search/results/x.py", True),
        ("from search.results import export", "search/study/x.py", False),
        ("from search.spec.runspec import RunSpec", "search/workers/x.py", True),
    ],
)
def test_the_checker_sees_a_broken_rule(tmp_path, monkeypatch, source, importer, ok):
    """The rule check itself can fail: each case is a file placed in the tree's shape under tmp_path."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / importer
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    package, allowed = rule_for(module_name(path))
    assert all(within(m, allowed) for _, m in imported_modules(path)) == ok


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name imported from a module stands for the module)."""
    paths = {module_name(p): p for p in source_files()}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for module, path in paths.items():
        for _, imported in imported_modules(path):
            target = imported if imported in paths else imported.rpartition(".")[0]
            if target in paths and target != module:
                graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other round a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_round_a_circle():
    assert circles(import_graph()) == []


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"search/results/a.py": "from search.results import b", "search/results/b.py": "from search.results.a import x"},
         [["search.results.a", "search.results.b"]]),
        ({"spaces/a.py": "def f():\n    from spaces import b", "spaces/b.py": "from .c import y",
          "spaces/c.py": "from . import a"}, [["spaces.a", "spaces.b", "spaces.c"]]),
        ({"spaces/a.py": "from spaces import b", "spaces/b.py": "import search.engine.x"}, []),
    ],
)
def test_the_checker_sees_a_circle(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    assert circles(import_graph()) == expected
