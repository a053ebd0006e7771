"""Merge parameters: scalars, gradients and filter lists, resolved as mergekit 0.1.5 does.

A setting is one of
- a scalar (`0.5`, `true`),
- a gradient: a list of scalars interpolated over the layers of a slice
  (layer i of n sits at t = i / (n - 1); a one-layer slice sits at t = 1;
  tensors outside the layers - embeddings, final norm, head - sit at t = 0),
- a filter list: `[{filter: self_attn, value: ...}, ..., {value: ...}]`, where
  the first entry whose filter is a substring of the tensor name (or has no
  filter, or `*`) gives the value.

Settings live at several levels; the most specific one that yields a value wins:
the source entry's `parameters` (for per-model parameters), then the slice's,
then the recipe's. When no level gives a value the method's default applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional

from pydantic import TypeAdapter, ValidationError

from search.engine.errors import UserError
from search.engine.recipe import Conditional

Scope = Literal["shared", "input", "non_base"]
REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method reads. `scope`: one value per tensor (shared), per input
    model (input), or per input model other than the base (non_base)."""

    name: str
    type: Any = float
    scope: Scope = "shared"
    default: Any = REQUIRED
    _adapter: TypeAdapter = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_adapter", TypeAdapter(self.type))

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any) -> Any:
        """Coerce like mergekit's pydantic validation ("0.5" -> 0.5, 1 -> True for a bool)."""
        try:
            return self._adapter.validate_python(value)
        except ValidationError:
            raise UserError(f"parameters.{self.name}: {value!r} is not a valid {_type_name(self.type)}; fix the value") from None


def _type_name(t: Any) -> str:
    return {float: "number", bool: "boolean", int: "integer"}.get(t, "number or null")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def evaluate_setting(tensor_name: str, setting: Any, t: float, spec: ParamSpec) -> Any:
    """One level's value for one tensor at position t, or None when its filters do not match."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if _is_scalar(setting):
        return spec.validate(setting)
    if not isinstance(setting, list):
        raise UserError(f"parameters.{spec.name}: unexpected setting {setting!r}; give a value, a list of values or a filter list")
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [spec.validate(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]  # booleans and labels are picked, not blended
        # The same float arithmetic as mergekit, so interpolated anchors agree to the bit.
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, Conditional):
            raise UserError(f"parameters.{spec.name}: mixes plain values and filter entries; use one form")
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(tensor_name, cond.value, t, spec)
    return None


Levels = Iterable[Optional[Mapping[str, Any]]]


def resolve(spec: ParamSpec, levels: Levels, tensor_name: str, t: float, model: str | None = None) -> Any:
    """The value of one parameter for one tensor: the first level that yields one, else the default."""
    for level in levels:
        if level is not None and spec.name in level:
            value = evaluate_setting(tensor_name, level[spec.name], t, spec)
            if value is not None:
                return value
    if spec.required:
        whose = f" for {model}" if model else ""
        raise UserError(
            f"parameters.{spec.name}: required{whose} (tensor {tensor_name}) but not set; "
            f"add `{spec.name}:` to the recipe's, the slice's or that model's parameters"
        )
    return spec.validate(spec.default)


def layer_position(index: int, num_layers: int) -> float:
    """Where layer `index` of a slice of `num_layers` sits on a gradient."""
    return index / (num_layers - 1) if num_layers > 1 else 1


def anchor_values(setting: Any) -> Iterable[Any]:
    """Every scalar written in a setting (for range checks before any merge)."""
    if isinstance(setting, Conditional):
        yield from anchor_values(setting.value)
    elif isinstance(setting, list):
        for e in setting:
            yield from anchor_values(e)
    elif setting is not None:
        yield setting
