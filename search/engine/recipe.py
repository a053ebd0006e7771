"""Recipes: mergekit 0.1.5's YAML schema, typed.

A Recipe is the one object passed between spaces, workers, the study's storage
and export. Dumping one gives YAML that `mergekit-yaml` / `mergekit-moe` /
`mergekit-multi` accept unchanged, and loading that YAML gives the same Recipe.

Three shapes, as mergekit reads them:
- MergeRecipe: `models:` or `slices:` with a `merge_method` (mergekit-yaml);
- MoERecipe: `base_model` + `experts:` (mergekit-moe);
- a multi-stage file: several documents separated by `---`, intermediates named
  with `name:` and referred to by that name in later documents (mergekit-multi).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from search.engine import chat_template as chat_templates
from search.engine import safe_yaml
from search.engine.errors import UserError, short
from search.engine.tokenizer_config import TokenizerBlock

Scalar = Union[bool, int, float, str]


def _one_line_name(value: str) -> str:
    if not value or not value.isprintable():
        raise ValueError(f"{short(value)} is not a usable name; write it on one line, without control characters")
    return value


# A model or stage name (a hub id, a path, a stage's `name:`): error messages quote it, so one printable line.
Name = Annotated[str, AfterValidator(_one_line_name)]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class RecipeError(UserError, ValueError):
    """A recipe that cannot be built; the message is one line naming the field and the fix."""


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them by name.
    model_config = ConfigDict(extra="forbid")


class Conditional(_Strict):
    """One entry of a filter list: `value` applies to tensors whose name contains `filter`."""

    filter: Optional[str] = None
    value: ScalarOrGradient


ParameterSetting = Union[Conditional, list[Conditional], ScalarOrGradient]
Parameters = dict[str, ParameterSetting]


class InputModel(_Strict):
    model: Name
    parameters: Optional[Parameters] = None


class InputSlice(_Strict):
    model: Name
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _ordered(self):
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(self.layer_range)} must be [start, end] with 0 <= start < end")
        return self


class OutputSlice(_Strict):
    sources: list[InputSlice]
    base_model: Optional[Name] = None
    residual_weight: Optional[float] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _same_depth(self):
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        depths = {end - start for start, end in (s.layer_range for s in self.sources)}
        if len(depths) != 1:
            raise ValueError("every source of one slice must span the same number of layers")
        return self

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class MergeRecipe(_Strict):
    """A mergekit-yaml config."""

    name: Optional[Name] = None  # set on intermediate stages of a multi-stage file
    merge_method: str
    slices: Optional[list[OutputSlice]] = None
    models: Optional[list[InputModel]] = None
    base_model: Optional[Name] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[Name] = None
    tokenizer: Optional[TokenizerBlock] = None
    chat_template: Optional[str] = None  # auto, a name mergekit ships, or a Jinja template (chat_template.py)

    @field_validator("chat_template")
    @classmethod
    def _usable_template(cls, value):
        # mergekit would fail on it only once the merge is written; refuse it now
        message = chat_templates.problem(value)
        if message is not None:
            raise ValueError(message)
        return value

    @model_validator(mode="after")
    def _one_input_form(self):
        if bool(self.slices) == bool(self.models):
            raise ValueError("give exactly one of `models:` or `slices:`")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
        return self

    def referenced_models(self) -> list[str]:
        """Every model name the recipe reads, in order of first mention, base first."""
        names = [self.base_model] if self.base_model else []
        for m in self.models or []:
            names.append(m.model)
        for s in self.slices or []:
            if s.base_model:
                names.append(s.base_model)
            names.extend(src.model for src in s.sources)
        return list(dict.fromkeys(names))


class Expert(_Strict):
    source_model: Name
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


# hidden_avg / hidden_last are mergekit-moe variants of hidden it accepts without listing them.
GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random", "hidden_avg", "hidden_last"]


class MoERecipe(_Strict):
    """A mergekit-moe config (recognised by its `experts:`)."""

    name: Optional[Name] = None
    base_model: Name
    experts: list[Expert]
    gate_mode: GateMode = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None

    @model_validator(mode="after")
    def _enough_experts(self):
        if self.experts_per_token < 1:
            raise ValueError("experts_per_token must be at least 1")
        if len(self.experts) < self.experts_per_token:
            raise ValueError(
                f"experts_per_token is {self.experts_per_token} but only {len(self.experts)} experts are listed"
            )
        if self.gate_mode != "random":  # mergekit-moe asks for prompts for every other gate
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"experts[{i}].positive_prompts is required for gate_mode {self.gate_mode}")
        return self

    def referenced_models(self) -> list[str]:
        names = [self.base_model] + [e.source_model for e in self.experts]
        names += [e.source_model for e in self.shared_experts or []]
        return list(dict.fromkeys(names))


Recipe = Union[MergeRecipe, MoERecipe]


# ---- YAML in and out -------------------------------------------------------


class _FlowListDumper(yaml.SafeDumper):
    """Numbers lists in flow style (`[0, 0.5, 1]`), as mergekit writes them."""


def _represent_list(dumper, data):
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
_FlowListDumper.add_representer(tuple, _represent_list)


def to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json", exclude_none=True, exclude_defaults=False)


def dump(recipe: Recipe) -> str:
    """One recipe as YAML that mergekit accepts unchanged."""
    data = to_dict(recipe)
    if isinstance(recipe, MoERecipe):
        data.pop("name", None)  # mergekit-moe refuses no key, but its schema has no `name`
    return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)


def dump_stages(stages: list[Recipe]) -> str:
    """Several recipes as one multi-document file, in the order mergekit-multi builds them."""
    if len(stages) == 1:
        return dump(stages[0])
    return "---\n".join(yaml.dump(to_dict(s), Dumper=_FlowListDumper, sort_keys=False) for s in stages)


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_one_input_form()]",) or "[" in str(part) or str(part)[:1].isupper():
            continue  # pydantic's names for union branches, not fields of the user's file
        else:
            key = str(part)  # a key of the user's file: quoted when empty or unprintable (keeps one line)
            out += ("." if out else "") + (key if key.isprintable() and key.strip() == key and key else repr(key))
    return out or "(top level)"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = _where(first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if where == "(top level)" and first["type"] == "value_error":
        return msg  # a model-level check: its message already starts with the field it names
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against mergekit's schema"
    elif first["type"] == "missing":
        msg = "required but missing; add it"
    return f"{where}: {msg}"


def from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Validate one YAML document: a MoE config if it has `experts:`, else a merge config."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of mergekit config keys, got {type(data).__name__}")
    kind = MoERecipe if "experts" in data else MergeRecipe
    if kind is MoERecipe and "chat_template" in data:
        raise RecipeError(
            f"{where}: chat_template: mergekit-moe has no such key (it ignores it and keeps the base model's "
            "template); remove it, or set the template in a mergekit-yaml stage that builds the base model"
        )
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: {_one_line(e)}") from None


def loads(text: str, where: str = "recipe") -> list[Recipe]:
    """Every stage in a (possibly multi-document) YAML text, in file order."""
    try:
        docs = [d for d in safe_yaml.load_all(text, where) if d is not None]
    except UserError as e:
        raise RecipeError(str(e)) from None
    if not docs:
        raise RecipeError(f"{where}: the file is empty; write a mergekit config in it")
    stages = [from_dict(d, where if len(docs) == 1 else f"{where} (document {i + 1})") for i, d in enumerate(docs)]
    check_stage_names(stages, where)
    return stages


def load(path: str | Path) -> list[Recipe]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file; check the path")
    try:
        text = safe_yaml.read_text(path, str(path))
    except UserError as e:
        raise RecipeError(str(e)) from None
    return loads(text, where=str(path))


def check_stage_names(stages: list[Recipe], where: str = "recipe") -> None:
    """mergekit-multi's rules: every stage but the last is named, names are unique."""
    if len(stages) == 1:
        return
    names = [s.name for s in stages]
    for i, n in enumerate(names[:-1]):
        if not n:
            raise RecipeError(f"{where} (document {i + 1}): name is required on every stage but the last; add `name: ...`")
    if len(set(n for n in names if n)) != len([n for n in names if n]):
        raise RecipeError(f"{where}: two stages share one name; give each stage its own `name:`")


def as_stages(recipe: Recipe | list[Recipe]) -> list[Recipe]:
    """A single recipe or a multi-stage list, always as a list of stages (last = the output)."""
    return list(recipe) if isinstance(recipe, (list, tuple)) else [recipe]
