"""Whether two recipes build the same model, as mergekit 0.1.5 reads them, without any tensor.

Recipes that read alike to mergekit may be written apart: `models:` or one slice over
every layer, a scalar or a gradient of equal anchors or a filter list of equal values,
a parameter left to its default or written out. `meaning` reads a recipe the way the
planner (search/engine/plan.py) does, tensor position by tensor position: the sources
each output layer reads, and every parameter resolved at that position (defaults of
the built-in methods included, search/engine/method_params.py). Two recipes with one
meaning compute the same tensors.

Filters are substrings of tensor names, and a name's value depends only on which of the
recipe's filters it contains, so the names probed are one per set of filters (joined by
a character no filter has); more than MAX_FILTERS distinct filters are compared as
written. Torch-free: the spaces and the driver read recipes with it.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from search.engine.errors import UserError
from search.engine.method_params import PARAMS
from search.engine.parameters import ParamSpec, layer_position, resolve
from search.engine.recipe import Conditional, InputSlice, MergeRecipe, OutputSlice, Recipe, to_dict

MAX_FILTERS = 8  # 2^8 probe names per tensor position; recipes hold a handful of filters
_JOIN = "\x00"  # in no filter: a probe name contains exactly the filters it joins (and their substrings)

Depth = Callable[[str], int]  # a model's number of layers


def same_merge(a: Recipe | list[Recipe], b: Recipe | list[Recipe], depth: Depth) -> bool:
    """True when `a` and `b` (a recipe or stages) build the same model, tensor for tensor."""
    a, b = _stages(a), _stages(b)
    if len(a) != len(b):
        return False
    return all(_same_stage(x, y, depth) for x, y in zip(a, b))


def _stages(recipe) -> list:
    return list(recipe) if isinstance(recipe, list) else [recipe]


def _same_stage(a: Recipe, b: Recipe, depth: Depth) -> bool:
    if to_dict(a) == to_dict(b):
        return True
    if not (isinstance(a, MergeRecipe) and isinstance(b, MergeRecipe)) or a.merge_method != b.merge_method:
        return False  # a MoE recipe has no other spelling; another method is another merge
    filters = sorted(_filters(a) | _filters(b))
    if len(filters) > MAX_FILTERS:
        return False
    probes = [_JOIN.join(chosen) for k in range(len(filters) + 1) for chosen in itertools.combinations(filters, k)]
    specs = _specs(a.merge_method, _names(a) | _names(b))
    try:
        return meaning(a, depth, probes, specs) == meaning(b, depth, probes, specs)
    except (UserError, KeyError, ValueError):  # a recipe the planner would refuse, or a model of unknown depth
        return False


def meaning(recipe: MergeRecipe, depth: Depth, probes: list[str], specs: list[ParamSpec]) -> tuple:
    """What the planner reads of `recipe`: its header, then per tensor position (embeddings, each output
    layer, final norm and head) the sources read and every parameter's value on each probe name."""
    header = {k: v for k, v in to_dict(recipe).items() if k not in ("models", "slices", "parameters", "base_model")}
    slices = _as_slices(recipe, depth)
    first, last = slices[0], slices[-1]
    positions = [_position(recipe, first, [(s.model, None) for s in first.sources], 0.0, probes, specs)]
    for s in slices:
        n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        for offset in range(n):
            read = [(src.model, src.layer_range[0] + offset) for src in s.sources]
            positions.append(_position(recipe, s, read, layer_position(offset, n), probes, specs))
    # mergekit pairs the last slice's models with as many inputs as the first slice has
    read = [(src.model, None) for src in last.sources][: len(first.sources)]
    positions.append(_position(recipe, last, read, 0.0, probes, specs))
    return tuple(sorted(header.items())), tuple(positions)


def _position(recipe: MergeRecipe, s: OutputSlice, read: list[tuple[str, int | None]], t: float,
              probes: list[str], specs: list[ParamSpec]) -> tuple:
    base = s.base_model or recipe.base_model
    shared = [p for p in specs if p.scope == "shared"]
    per_input = [p for p in specs if p.scope == "input" or p.scope == "non_base"]
    values = []
    for probe in probes:
        values.append(tuple(resolve(p, (s.parameters, recipe.parameters), probe, t) for p in shared))
        for model, _ in read:
            levels = [src.parameters for src in s.sources if src.model == model] + [s.parameters, recipe.parameters]
            values.append(tuple(resolve(p, levels, probe, t, model=model) for p in per_input
                                if p.scope == "input" or model != base))
    return base, tuple(read), tuple(values)


def _as_slices(recipe: MergeRecipe, depth: Depth) -> list[OutputSlice]:
    """`models:` as mergekit expands it: one slice over every layer, the base added when not listed."""
    if recipe.slices:
        return recipe.slices
    names = [m.model for m in recipe.models]
    sources = [InputSlice(model=m.model, layer_range=(0, depth(m.model)), parameters=m.parameters)
               for m in recipe.models]
    if recipe.base_model and recipe.base_model not in names:
        sources.append(InputSlice(model=recipe.base_model, layer_range=(0, depth(recipe.base_model))))
    return [OutputSlice(sources=sources)]


def _specs(method: str, names: set[str]) -> list[ParamSpec]:
    """The method's parameters, with defaults; for a method mergekit runs for us, every name written (unset: None)."""
    if method in PARAMS:
        return list(PARAMS[method])
    return [ParamSpec(n, Any, "input", None) for n in sorted(names)]


def _levels(recipe: MergeRecipe) -> list[dict | None]:
    out = [recipe.parameters] + [m.parameters for m in recipe.models or []]
    for s in recipe.slices or []:
        out += [s.parameters] + [src.parameters for src in s.sources]
    return out


def _names(recipe: MergeRecipe) -> set[str]:
    return {name for level in _levels(recipe) for name in (level or {})}


def _filters(recipe: MergeRecipe) -> set[str]:
    found = set()

    def walk(setting: Any) -> None:
        if isinstance(setting, Conditional):
            if setting.filter not in (None, "*"):
                found.add(setting.filter)
            walk(setting.value)
        elif isinstance(setting, list):
            for entry in setting:
                walk(entry)

    for level in _levels(recipe):
        for setting in (level or {}).values():
            walk(setting)
    return found
