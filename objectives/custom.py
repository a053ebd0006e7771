"""A user's own score: `module:function(model, tokenizer, fidelity) -> float | dict`.

    - kind: custom
      function: mypkg.scores:accuracy       # a module on sys.path, or a file: scores.py:accuracy
      key: acc                              # which entry, when the function returns a dict
      heldout_function: scores.py:accuracy_heldout   # optional; called with fidelity None
      fidelities: [16, 64]                  # passed through as `fidelity`; None = everything
      direction: maximize

Files resolve against the run spec's folder. Without `heldout_function` the
objective has no held-out split (`has_heldout` is False) and `score_heldout`
returns the full search score.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

from objectives import Objective
from objectives.fidelity import check_fidelities
from objectives.spec import SpecReader
from search.engine.errors import UserError


def load_function(reference: str, base_dir: Path, where: str) -> Callable:
    """`pkg.mod:fn` (importable) or `path/to/file.py:fn` (relative to base_dir) -> the function."""
    module_ref, _, attr = reference.rpartition(":")
    if not module_ref or not attr:
        raise UserError(f"{where}: expected 'module:function' or 'file.py:function', got {reference!r}")
    if module_ref.endswith(".py"):
        path = Path(module_ref).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise UserError(f"{where}: {path} does not exist; give a path relative to the run spec's folder")
        module_name = f"mergesearch_custom_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            raise UserError(f"{where}: cannot import {module_ref!r} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{where}: {module_ref!r} has no function {attr!r}")
    return fn


class CustomObjective(Objective):
    kind = "custom"

    def __init__(
        self,
        function: Callable,
        name: str,
        direction: str = "maximize",
        fidelities: list[int] | None = None,
        key: str | None = None,
        heldout_function: Callable | None = None,
    ):
        self.function, self.heldout_function = function, heldout_function
        self.name, self.direction, self.fidelities, self.key = name, direction, fidelities, key
        self.has_heldout = heldout_function is not None
        self.last_details: dict[str, float] = {}

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "CustomObjective":
        r = SpecReader(spec, where, base_dir)
        r.raw("kind")
        reference = r.str("function")
        if reference is None:
            raise r.fail("function", "missing; expected 'module:function' or 'file.py:function'")
        heldout_ref = r.str("heldout_function")
        obj = cls(
            load_function(reference, base_dir, f"{where}.function"),
            name=r.str("name", reference.rpartition(":")[2]),
            direction=r.direction("maximize"),
            fidelities=check_fidelities(r.raw("fidelities"), where),
            key=r.str("key"),
            heldout_function=load_function(heldout_ref, base_dir, f"{where}.heldout_function") if heldout_ref else None,
        )
        r.done()
        return obj

    def _number(self, result, function: Callable) -> float:
        label = f"objective {self.name!r}: {getattr(function, '__qualname__', function)}"
        if isinstance(result, dict):
            self.last_details = {str(k): float(v) for k, v in result.items()}
            if self.key is not None:
                if self.key not in result:
                    raise UserError(f"{label} returned no {self.key!r} (keys: {', '.join(map(str, result))}); fix `key`")
                result = result[self.key]
            elif len(result) == 1:
                result = next(iter(result.values()))
            else:
                raise UserError(f"{label} returned several values ({', '.join(map(str, result))}); set `key` to pick one")
        try:
            value = float(result)
        except (TypeError, ValueError):
            raise UserError(f"{label} returned {result!r}; expected a number or a dict of numbers") from None
        if math.isnan(value):
            raise UserError(f"{label} returned NaN")
        return value

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        return self._number(self.function(model, tokenizer, fidelity), self.function)

    def score_heldout(self, model, tokenizer) -> float:
        if self.heldout_function is None:
            return self.score(model, tokenizer, None)
        return self._number(self.heldout_function(model, tokenizer, None), self.heldout_function)
