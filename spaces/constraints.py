"""Constraints on a candidate's size, checked on the recipe before anything is built.

Spec keys, accepted by every space:

    max_layers: 48          # the output model has at most this many layers
    max_params: 7.5B        # ... and at most this many parameters (an int, 7.5e9, or 750M / 7.5B)

A candidate that breaks one raises optuna.TrialPruned with the reason: the driver
records the trial as pruned, not failed, and the sampler learns to avoid the region.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from optuna import TrialPruned

from search.engine.errors import UserError, short
from search.engine.recipe import MoERecipe, Recipe, as_stages

from .model_info import ModelInfo

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def output_layers(recipe: Recipe, models: dict[str, ModelInfo]) -> int:
    """How many decoder layers the model built from `recipe` has."""
    if isinstance(recipe, MoERecipe):
        return models[recipe.base_model].num_layers
    if recipe.slices:
        return sum(s.num_layers for s in recipe.slices)
    return models[recipe.base_model or recipe.models[0].model].num_layers


def output_params(recipe: Recipe, models: dict[str, ModelInfo]) -> int:
    """How many parameters the model built from `recipe` has (all sources must have known counts)."""
    if isinstance(recipe, MoERecipe):
        base = models[recipe.base_model]
        experts = len(recipe.experts) + len(recipe.shared_experts or [])
        router = len(recipe.experts) * base.hidden_size  # Mixtral's gate: Linear(hidden, experts), no bias
        per_layer = base.attn_params + base.norm_params + experts * base.mlp_params + router
        return base.outside_params + base.num_layers * per_layer
    if recipe.slices:
        first = recipe.base_model or recipe.slices[0].sources[0].model
        layers = sum(models[s.sources[0].model].params_per_layer * s.num_layers for s in recipe.slices)
        return models[first].outside_params + layers
    return models[recipe.base_model or recipe.models[0].model].total_params


def parse_count(value, where: str) -> int:
    """7000000, 7e6, '7M', '7.5B' -> an int."""
    count = value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMBGT]?)\s*", value, re.IGNORECASE)
        count = float(m.group(1)) * _SUFFIX[m.group(2).upper()] if m else None
    # at least 1, and neither NaN nor infinite ("1e999" reads as infinity)
    if isinstance(count, (int, float)) and not isinstance(count, bool) and 1 <= count < math.inf:
        return int(count)
    raise UserError(f"{where}: expected a positive count like 1500000000, 1.5e9 or 1.5B, got {short(value)}")


@dataclass(frozen=True)
class Constraints:
    max_layers: int | None = None
    max_params: int | None = None

    @classmethod
    def read(cls, spec) -> "Constraints":
        """Take max_layers / max_params out of a SpecReader."""
        max_layers = spec.take("max_layers", None)
        if max_layers is not None and (not isinstance(max_layers, int) or isinstance(max_layers, bool) or max_layers < 1):
            spec.fail("max_layers", f"expected a positive integer, got {short(max_layers)}")
        max_params = spec.take("max_params", None)
        if max_params is not None:
            max_params = parse_count(max_params, spec.at("max_params"))
        return cls(max_layers, max_params)

    def require_counts(self, names: list[str], models: dict[str, ModelInfo], where: str) -> None:
        """max_params needs parameter counts: refuse, at spec time, a model whose family we cannot count."""
        if self.max_params is None:
            return
        for name in names:
            if models[name].params_per_layer is None:
                raise UserError(
                    f"{where}.max_params: cannot count the parameters of {short(name)} "
                    f"(model_type {models[name].model_type}); use max_layers instead"
                )

    def check(self, recipe: Recipe | list[Recipe], models: dict[str, ModelInfo]) -> None:
        """Raise optuna.TrialPruned if the output (the last stage) breaks a constraint."""
        final = as_stages(recipe)[-1]
        if self.max_layers is not None:
            n = output_layers(final, models)
            if n > self.max_layers:
                raise TrialPruned(f"constraint: {n} layers > max_layers {self.max_layers}")
        if self.max_params is not None:
            p = output_params(final, models)
            if p > self.max_params:
                raise TrialPruned(f"constraint: {p} parameters > max_params {self.max_params}")

