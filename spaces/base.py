"""What every space shares: suggest with constraints, and params() checked by replay.

A space is define-by-run: `build(trial)` asks the trial for values and returns a
Recipe. `params(recipe)` goes the other way, so known recipes can seed a study;
each space proposes the params it believes give the recipe, and they are accepted
only if replaying them through `suggest` gives back that recipe, or one that mergekit
reads alike (search/engine/same_merge.py: `t: 0.5` is the space's curves at 0.5, a
`models:` recipe is one slice per group of layers, a default is the value written out).
"""

from __future__ import annotations

from typing import Any, ClassVar

from optuna import TrialPruned

from search.engine.errors import UserError, short
from search.engine.recipe import InputSlice, MergeRecipe, OutputSlice, Recipe, as_stages, to_dict
from search.engine.same_merge import same_merge

from .constraints import Constraints
from .model_info import ModelInfo
from .spec import NotInSpace, SpecReader

MERGE_DTYPES = ("float32", "float16", "bfloat16")


class Space:
    kind: ClassVar[str]

    def __init__(self, spec: dict, models: dict[str, ModelInfo], where: str = "space"):
        self.models = models
        self.where = where
        reader = SpecReader(spec, where, models)
        reader.take("kind", None)
        self.used_models: list[str] = []  # set by read(): the models this space's recipes name
        self.read(reader)
        self.constraints = Constraints.read(reader)
        reader.finish()
        self.constraints.require_counts(self.used_models, self.checked_models(), where)

    # ---- what each space defines ---------------------------------------------

    def read(self, spec: SpecReader) -> None:
        raise NotImplementedError

    def build(self, trial) -> Recipe | list[Recipe]:
        raise NotImplementedError

    def propose_params(self, recipe: Recipe | list[Recipe]) -> list[dict[str, Any]]:
        """Params that may reproduce `recipe`, most likely first; NotInSpace if none can."""
        raise NotImplementedError

    def output_info(self) -> ModelInfo | None:
        """The output model's shape when every trial gives the same one (for later stages), else None."""
        return None

    def checked_models(self) -> dict[str, ModelInfo]:
        return self.models

    def defaults(self) -> dict[str, Recipe | list[Recipe]]:
        """The merges a person would write by hand for this space, by name: the run's baselines.
        They need not be points of the space (a linear average in a TIES-only space)."""
        return {}

    # ---- the interface the driver uses ----------------------------------------

    def suggest(self, trial) -> Recipe | list[Recipe]:
        recipe = self.build(trial)
        self.constraints.check(recipe, self.checked_models())
        return recipe

    def depth(self, model: str) -> int:
        """A model's layers, as a recipe of this space names it (a stage's output too); KeyError if unknown."""
        info = self.checked_models().get(model)
        if not isinstance(getattr(info, "num_layers", None), int):
            raise KeyError(model)
        return info.num_layers

    def params(self, recipe: Recipe | list[Recipe]) -> dict[str, Any]:
        """The point of the space that builds `recipe`: the recipe itself, or one that mergekit reads alike
        (`models:` or one slice over all layers, a scalar or a constant curve, a default written out;
        search/engine/same_merge.py). UserError when no point does."""
        try:
            candidates = self.propose_params(recipe)
        except NotInSpace as e:
            raise UserError(f"{self.where}: the recipe is not a point of this {self.kind} space: {e}") from None
        reason = "no params proposed"
        for params in candidates:
            trial = ReplayTrial(params)
            try:
                again = self.suggest(trial)
            except NotInSpace as e:
                reason = str(e)
                continue
            except TrialPruned as e:
                raise UserError(f"{self.where}: the recipe breaks the space's constraints: {e}") from None
            if not same_merge(again, recipe, self.depth):  # the point builds another model
                difference = first_difference(_plain(again), _plain(recipe)) or ""
                reason = f"the nearest point of the space differs at {difference.removeprefix('[0].')}"
                continue
            unused = sorted(set(params) - trial.asked)
            if unused:  # a bug in propose_params: the study would not record these
                raise AssertionError(f"{self.kind}: params {unused} are never asked for")
            return params
        raise UserError(f"{self.where}: the recipe is not a point of this {self.kind} space: {reason}")

    # ---- helpers for subclasses ----------------------------------------------

    def read_output_options(self, spec: SpecReader) -> None:
        """dtype / out_dtype / tokenizer_source: copied into every recipe unchanged."""
        self.dtype = spec.string("dtype", None)
        self.out_dtype = spec.string("out_dtype", None)
        self.tokenizer_source = spec.string("tokenizer_source", None)
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in MERGE_DTYPES:
                spec.fail(key, f"{short(value)} is not one of {', '.join(MERGE_DTYPES)}")

    def output_options(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, out_dtype=self.out_dtype, tokenizer_source=self.tokenizer_source)

    def check_output_options(self, recipe) -> None:
        for key, value in self.output_options().items():
            if getattr(recipe, key) != value:
                raise NotInSpace(f"{key} is {short(getattr(recipe, key))} but the space writes {short(value)}")

    def check_same_shape(self, spec: SpecReader, fields: list[tuple[str, str]]) -> None:
        """Models merged tensor by tensor must share family, depth and width. fields: (spec field, model)."""
        self._check_alike(spec, fields, ("model_type", "num_layers", "hidden_size"), "merge models of one shape")

    def check_same_family(self, spec: SpecReader, fields: list[tuple[str, str]]) -> None:
        """Layers stacked from several models must come from one family and width."""
        self._check_alike(spec, fields, ("model_type", "hidden_size"), "stack layers of one family and width")

    def check_depth_can_change(self, spec: SpecReader, fields: list[tuple[str, str]]) -> None:
        """Stacks and expansions change the depth, which mergekit 0.1.5 cannot write into a config
        that lists something per layer: transformers 5 refuses that config, so mergekit writes nothing."""
        for key, name in fields:
            info = self.models[name]
            if info.fixed_depth:
                spec.fail(
                    key,
                    f"{short(name)} is a {info.model_type} model whose config.json lists layer_types, which mergekit "
                    "0.1.5 cannot write at another depth; search it with a slerp or weights space",
                )

    def _check_alike(self, spec: SpecReader, fields, attributes, fix: str) -> None:
        _, first_name = fields[0]
        first = self.models[first_name]
        for key, name in fields[1:]:
            other = self.models[name]
            for attribute in attributes:
                if getattr(other, attribute) != getattr(first, attribute):
                    spec.fail(
                        key,
                        f"{short(name)} has {attribute} {getattr(other, attribute)} but {short(first_name)} has "
                        f"{getattr(first, attribute)}; {fix}",
                    )


def model_alone(model: str, num_layers: int, **output_options) -> MergeRecipe:
    """One model as it is: a passthrough of all its layers (the engine aliases every tensor)."""
    only = OutputSlice(sources=[InputSlice(model=model, layer_range=(0, num_layers))])
    return MergeRecipe(merge_method="passthrough", slices=[only], **output_options)


def listed(key: str, names: list[str]) -> list[tuple[str, str]]:
    """(`models[i]`, name) pairs, for error messages that point at the list entry."""
    return [(f"{key}[{i}]", name) for i, name in enumerate(names)]


class ReplayTrial:
    """A trial that answers from fixed params and refuses anything outside the space.

    Unlike optuna's FixedTrial (which only warns), a value out of range or a
    missing name raises NotInSpace, and params that are never asked for are
    reported, so params() returns exactly the params a study would record.
    """

    def __init__(self, params: dict[str, Any]):
        self._params = params
        self.asked: set[str] = set()
        self.number = 0

    def _answer(self, name: str, ok: bool, what: str):
        if name not in self._params:
            raise NotInSpace(f"param {name} is missing")
        value = self._params[name]
        if not ok(value):
            raise NotInSpace(f"param {name} = {short(value)} is not {what}")
        self.asked.add(name)
        return value

    def suggest_float(self, name: str, low: float, high: float, *, step=None, log: bool = False) -> float:
        ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high  # noqa: E731
        return self._answer(name, ok, f"in [{low}, {high}]")

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high  # noqa: E731
        return self._answer(name, ok, f"an integer in [{low}, {high}]")

    def suggest_categorical(self, name: str, choices):
        ok = lambda v: any(v == c and type(v) is type(c) for c in choices)  # noqa: E731
        return self._answer(name, ok, f"one of {list(choices)}")

    def set_user_attr(self, key: str, value: Any) -> None:
        pass


class PrefixedTrial:
    """Forwards every suggestion with `prefix.` on its name, so stages of a composition never collide."""

    def __init__(self, trial, prefix: str):
        self._trial = trial
        self._prefix = prefix

    @property
    def number(self) -> int:
        return self._trial.number

    def suggest_float(self, name: str, *args, **kwargs):
        return self._trial.suggest_float(f"{self._prefix}.{name}", *args, **kwargs)

    def suggest_int(self, name: str, *args, **kwargs):
        return self._trial.suggest_int(f"{self._prefix}.{name}", *args, **kwargs)

    def suggest_categorical(self, name: str, choices):
        return self._trial.suggest_categorical(f"{self._prefix}.{name}", choices)

    def set_user_attr(self, key: str, value: Any) -> None:
        self._trial.set_user_attr(key, value)


def single(recipe: Recipe | list[Recipe]) -> Recipe:
    """The one recipe of a single-stage space (a list of one is accepted too)."""
    stages = as_stages(recipe)
    if len(stages) != 1:
        raise NotInSpace(f"it has {len(stages)} stages; this space writes one")
    return stages[0]


def _plain(recipe: Recipe | list[Recipe]) -> list[dict]:
    return [to_dict(s) for s in as_stages(recipe)]


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two dumped recipes first differ (`[0].slices[2].sources`), or None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}.{key}"
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b and isinstance(a, bool) == isinstance(b, bool) else path
