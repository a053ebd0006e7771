"""Reading a space's YAML spec: one-line errors that name the field, and knobs.

A knob is one quantity a space either searches or fixes. In a spec a number fixes
it (`scale: 0.0`) and a pair searches it (`weight: [0, 1]`); a single string fixes a
choice (`gate_mode: random`) and a list searches it (`gate_mode: [hidden, random]`).
A fixed knob asks nothing of the trial, so it never appears in the study's params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from search.engine.errors import UserError, short

from .model_info import ModelInfo

_MISSING = object()


class NotInSpace(Exception):
    """A recipe (or a param) that no trial of this space can produce; the message says why."""


def _is_number(v: Any) -> bool:
    """A finite int or float: NaN, infinities and ints beyond a float's range are not numbers here."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class FloatKnob:
    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def suggest(self, trial, name: str) -> float:
        return self.low if self.fixed else trial.suggest_float(name, self.low, self.high)

    def put(self, params: dict, name: str, value: Any) -> None:
        """Record in `params` what makes `suggest` return `value` (exactly)."""
        if not _is_number(value):
            raise NotInSpace(f"{name} is {short(value)}, not a number")
        if not self.low <= value <= self.high:
            raise NotInSpace(f"{name} = {value} is outside the space's range [{self.low}, {self.high}]")
        if not self.fixed:
            params[name] = float(value)


@dataclass(frozen=True)
class IntKnob:
    low: int
    high: int

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def suggest(self, trial, name: str) -> int:
        return self.low if self.fixed else trial.suggest_int(name, self.low, self.high)

    def put(self, params: dict, name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise NotInSpace(f"{name} is {short(value)}, not an integer")
        if not self.low <= value <= self.high:
            raise NotInSpace(f"{name} = {value} is outside the space's range [{self.low}, {self.high}]")
        if not self.fixed:
            params[name] = value


@dataclass(frozen=True)
class ChoiceKnob:
    choices: tuple

    @property
    def fixed(self) -> bool:
        return len(self.choices) == 1

    def suggest(self, trial, name: str):
        return self.choices[0] if self.fixed else trial.suggest_categorical(name, list(self.choices))

    def put(self, params: dict, name: str, value: Any) -> None:
        # `1 == True` in Python: compare types too, so a bool choice never matches an int.
        if not any(value == c and type(value) is type(c) for c in self.choices):
            raise NotInSpace(f"{name} is {short(value)}, not one of the space's choices {list(self.choices)}")
        if not self.fixed:
            params[name] = value


class SpecReader:
    """Takes keys out of one space spec; `finish()` refuses whatever is left (typos)."""

    def __init__(self, data: Any, where: str, models: dict[str, ModelInfo]):
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping with a `kind:` and the space's keys, got {type(data).__name__}")
        self.data = dict(data)
        self.where = where
        self.models = models
        self.known: list[str] = []

    def at(self, key: str) -> str:
        # a key of the user's spec (a typo, a model name under prompts:) is quoted and cut when odd or long
        plain = isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60
        return f"{self.where}.{key if plain else short(key)}"

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str, default: Any = _MISSING) -> Any:
        self.known.append(key)
        if key in self.data:
            return self.data.pop(key)
        if default is _MISSING:
            raise UserError(f"{self.at(key)}: required but missing; add it")
        return default

    def fail(self, key: str, message: str):
        raise UserError(f"{self.at(key)}: {message}")

    def finish(self) -> None:
        for key in self.data:
            raise UserError(f"{self.at(key)}: unknown key; use one of {', '.join(self.known)}")

    # ---- typed values -------------------------------------------------------

    def _model_name(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or value not in self.models:
            names = ", ".join(self.models)
            raise UserError(f"{where}: {short(value)} is not one of the run's models ({names}); use one of those names")
        reason = getattr(self.models[value], "unusable_reason", None)
        if reason:
            raise UserError(f"{where}: {reason}")
        return value

    def model(self, key: str, default: Any = _MISSING) -> str:
        value = self.take(key, default)
        return self._model_name(value, self.at(key))

    def model_list(self, key: str, min_count: int = 1, max_count: int | None = None, default: Any = _MISSING) -> list[str]:
        value = self.take(key, default)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(key, f"expected a list of model names, got {type(value).__name__}")
        names = [self._model_name(v, f"{self.at(key)}[{i}]") for i, v in enumerate(value)]
        if len(set(names)) != len(names):
            self.fail(key, "lists a model twice; list each model once")
        if len(names) < min_count or (max_count is not None and len(names) > max_count):
            want = f"exactly {min_count}" if min_count == max_count else f"at least {min_count}"
            if max_count is not None and max_count != min_count:
                want = f"{min_count} to {max_count}"
            self.fail(key, f"lists {len(names)} models; this space takes {want}")
        return names

    def string(self, key: str, default: Any = _MISSING) -> str | None:
        value = self.take(key, default)
        if value is not None and not isinstance(value, str):
            self.fail(key, f"expected a string, got {short(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.take(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {short(value)}")
        return value

    def _pair(self, key: str, value: Any, is_ok, kind: str) -> tuple:
        if is_ok(value):
            return value, value
        if isinstance(value, list) and len(value) == 2 and all(is_ok(v) for v in value):
            if value[0] > value[1]:
                self.fail(key, f"range [{short(value[0])}, {short(value[1])}] is reversed; write [low, high]")
            return value[0], value[1]
        self.fail(key, f"expected {kind} or a range [low, high], got {short(value)}")

    def float_knob(self, key: str, default: Any, bounds: tuple[float | None, float | None] = (None, None)) -> FloatKnob:
        low, high = self._pair(key, self.take(key, default), _is_number, "a number")
        if not math.isfinite(high - low):  # a sampler cannot draw from a range wider than a float
            self.fail(key, f"range [{low}, {high}] is too wide; narrow it")
        self._within(key, low, high, bounds)
        return FloatKnob(float(low), float(high))

    def int_knob(self, key: str, default: Any, bounds: tuple[int | None, int | None] = (None, None)) -> IntKnob:
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        low, high = self._pair(key, self.take(key, default), is_int, "an integer")
        self._within(key, low, high, bounds)
        return IntKnob(low, high)

    def _within(self, key: str, low, high, bounds) -> None:
        lo, hi = bounds
        if (lo is not None and low < lo) or (hi is not None and high > hi):
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            self.fail(key, f"[{short(low)}, {short(high)}] goes outside the allowed [{lo_s}, {hi_s}]; narrow it")

    def choice_knob(self, key: str, allowed: tuple, default: Any) -> ChoiceKnob:
        value = self.take(key, default)
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(key, f"is empty; give one of {list(allowed)} or a list of them")
        for v in values:
            if not any(v == a and type(v) is type(a) for a in allowed):
                self.fail(key, f"{short(v)} is not one of {list(allowed)}")
        if len(set(map(repr, values))) != len(values):
            self.fail(key, "lists a choice twice; list each once")
        return ChoiceKnob(tuple(values))
