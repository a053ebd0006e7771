"""Reading one objective's spec (a dict from the run spec's `objectives:` list).

Every problem is a one-line UserError that names the field, e.g.
`objectives[0].limit: expected a positive integer, got 'ten'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.engine.errors import UserError

DIRECTIONS = ("maximize", "minimize")


class SpecReader:
    """Typed access to a spec's fields; `done()` rejects fields nobody asked for (typos)."""

    def __init__(self, spec: Any, where: str, base_dir: Path):
        if not isinstance(spec, dict):
            raise UserError(f"{where}: expected a mapping like {{kind: lmeval, ...}}, got {spec!r}")
        self.spec, self.where, self.base_dir = spec, where, Path(base_dir)
        self.read: set[str] = set()

    def has(self, key: str) -> bool:
        return self.spec.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as written (None or absent: `default`); marks the field as known."""
        self.read.add(key)
        value = self.spec.get(key)
        return default if value is None else value

    def fail(self, key: str, message: str) -> UserError:
        return UserError(f"{self.where}.{key}: {message}")

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        if choices and value is not None and value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int | None:
        value = self.raw(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, must_exist: bool = True) -> Path | None:
        """A path; relative ones resolve against the run spec's folder."""
        value = self.str(key)
        if value is None:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if must_exist and not path.exists():
            raise self.fail(key, f"{path} does not exist; give a path relative to the run spec's folder or an absolute one")
        return path

    def direction(self, default: str) -> str:
        return self.str("direction", default, DIRECTIONS)

    def done(self) -> None:
        unknown = sorted(set(self.spec) - self.read)
        if unknown:
            known = ", ".join(sorted(self.read))
            raise UserError(f"{self.where}: unknown field {unknown[0]!r}; the fields of this kind are: {known}")
