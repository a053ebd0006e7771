"""The layout's import rules, read from the source (ast), so they hold as the code grows.

- search.engine imports nothing of ours outside search.engine;
- spaces and objectives import only themselves and search.engine;
- search (the loop and the commands) may import anything.
Imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("search", "spaces", "objectives")

# package -> the packages of ours it may import (prefixes of dotted module names)
ALLOWED = {
    "search.engine": ("search.engine",),
    "spaces": ("spaces", "search.engine"),
    "objectives": ("objectives", "search.engine"),
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
    for package, allowed in ALLOWED.items():
        if module == package or module.startswith(package + "."):
            return package, allowed
    return None


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def source_files() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


def test_every_package_imports_only_what_its_rule_allows():
    broken = []
    for path in source_files():
        rule = rule_for(module_name(path))
        if rule is None:
            continue
        package, allowed = rule
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
