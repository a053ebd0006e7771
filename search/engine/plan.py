"""Plan a merge: which inputs and parameters make each output tensor, as mergekit 0.1.5 plans it.

Planning reads only config.json files and safetensors headers. Everything that
can be wrong with a recipe is found here, before any tensor is touched, and
reported as a one-line UserError naming the field and the fix.

mergekit's plan, which this follows:
- `models:` is one slice over every layer of each model (the base model is
  added as a source when it is not listed);
- embeddings are planned over the first slice's sources, the final norm and
  head over the last slice's; both sit at t = 0 on gradients;
- the layers of each slice in turn, layer i of n at t = i / (n - 1);
- a shared parameter (`t`) is resolved on the output tensor's name from the
  slice's, then the recipe's parameters; a per-model parameter (`weight`) on
  the input tensor's name from that model's entry first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from search.engine.architectures import Architecture, WeightSpec, config_value, output_config
from search.engine.errors import UserError
from search.engine.hf_config import hf_config
from search.engine.mergekit_definitions import architecture_of
from search.engine.methods import Method, get_method
from search.engine.parameters import anchor_values, layer_position, resolve
from search.engine.recipe import InputSlice, MergeRecipe, OutputSlice
from search.engine.sources import TensorInfo

DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass
class ModelInfo:
    """What planning needs to know of a model: its config and its tensors' shapes and dtypes."""

    name: str
    config: dict
    tensors: dict[str, TensorInfo]
    arch: Architecture = field(init=False)

    def __post_init__(self):
        self.arch = architecture_of(self.config, f"model {self.name}")

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers(self.config)


@dataclass
class Job:
    """One output tensor: read `tensors[i]` from `models[i]`, merge with these parameters."""

    name: str
    models: list[str]
    tensors: list[str]
    base_index: int | None
    shared: dict[str, Any]
    per_input: list[dict[str, Any]]
    shape: tuple[int, ...]
    label: str  # mergekit runs its tensors in order of this name (it matters to random methods)
    take_only_input: bool = False  # an optional tensor present in one model only: copied from it
    vocabulary_axis: int | None = None  # the axis indexed by token ids (embeddings, the head)
    base_model: str | None = None  # the slice's base model (a vocabulary's rows may default to its)


@dataclass
class StagePlan:
    recipe: MergeRecipe
    method: Method
    jobs: list[Job]
    config: dict  # output config.json
    dtype: torch.dtype | None  # inputs are converted to this before merging
    out_dtype: torch.dtype | None  # outputs are converted to this
    output: ModelInfo  # the merge as later stages see it
    vocabulary: Any = None  # the output vocabulary of a stage with a tokenizer setting (vocabulary.py)

    def execution_order(self) -> list[Job]:
        """The order tensors are merged in: mergekit's, where random draws make order matter."""
        if not self.method.randomized:
            return self.jobs
        return [j for _, _, j in sorted((j.label, i, j) for i, j in enumerate(self.jobs))]


def parse_dtype(name: str | None, field_name: str) -> torch.dtype | None:
    if not name:
        return None
    dtype = DTYPES.get(name.removeprefix("torch."))
    if dtype is None:
        raise UserError(f"{field_name}: {name!r} is not a dtype mergekit knows; use one of {', '.join(DTYPES)}")
    return dtype


def _parameter_levels(recipe: MergeRecipe):
    """(where, parameters, is-per-model level) for every parameters block in the recipe."""
    yield "parameters", recipe.parameters, False
    for i, m in enumerate(recipe.models or []):
        yield f"models[{i}].parameters", m.parameters, True
    for i, s in enumerate(recipe.slices or []):
        yield f"slices[{i}].parameters", s.parameters, False
        for j, src in enumerate(s.sources):
            yield f"slices[{i}].sources[{j}].parameters", src.parameters, True


def check_parameters(recipe: MergeRecipe, method: Method) -> None:
    """Unknown names, shared parameters set per model, and t outside [0, 1]."""
    known = {p.name: p for p in method.params}
    for where, params, per_model in _parameter_levels(recipe):
        for name, setting in (params or {}).items():
            if name not in known:
                use = f"use {', '.join(known)}" if known else "it takes none; remove it"
                raise UserError(f"{where}.{name}: {method.name} has no parameter {name!r}; {use}")
            if per_model and known[name].scope == "shared":
                raise UserError(
                    f"{where}.{name}: {name} applies to the whole tensor, not to one model; "
                    "move it to the slice's or the recipe's parameters"
                )
            if name == "t":
                for v in anchor_values(setting):
                    x = known[name].validate(v)
                    if not 0 <= x <= 1:
                        raise UserError(f"{where}.t: {v} is outside [0, 1]; t runs from 0 (the base model) to 1 (the other model)")


def _as_slices(recipe: MergeRecipe, info: Callable[[str], ModelInfo]) -> list[OutputSlice]:
    if recipe.slices:
        return recipe.slices
    names = [m.model for m in recipe.models]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise UserError(f"models[{i}].model: {n} is listed twice; list each model once")
    depths = {n: info(n).num_layers for n in [*names, *([recipe.base_model] if recipe.base_model else [])]}
    first = names[0]
    other = next((n for n, d in depths.items() if d != depths[first]), None)
    if other is not None:
        raise UserError(
            f"models: {first} has {depths[first]} layers and {other} has {depths[other]}; a `models:` merge needs "
            "models of one depth (pick layer ranges of one length with `slices:`)"
        )
    sources = [InputSlice(model=m.model, layer_range=(0, depths[m.model]), parameters=m.parameters) for m in recipe.models]
    if recipe.base_model and recipe.base_model not in names:
        sources.append(InputSlice(model=recipe.base_model, layer_range=(0, depths[recipe.base_model])))
    return [OutputSlice(sources=sources)]


def _check_slice(i: int, s: OutputSlice, base: str | None, method: Method, info: Callable[[str], ModelInfo], form: str) -> None:
    where = f"slices[{i}]" if form == "slices" else "models"
    names = [src.model for src in s.sources]
    for j, n in enumerate(names):
        if n in names[:j]:
            raise UserError(f"{where}: {n} appears twice as a source; a slice takes each model once")
    if method.base == "required" and base is None:
        raise UserError(f"base_model: {method.name} needs a base model; add `base_model:` naming one of the models")
    if method.base != "ignored" and base is not None and base not in names:
        raise UserError(f"{where}: base_model {base} is not among the sources; add it as a source of this slice")
    count = len(names)
    if count < method.min_inputs:
        raise UserError(f"{where}: {method.name} needs at least {method.min_inputs} models, got {count}; add models")
    if method.max_inputs is not None and count > method.max_inputs:
        need = f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else f"at most {method.max_inputs}"
        raise UserError(f"{where}: {method.name} takes {need} model(s) per slice, got {count}; remove the extra ones")
    for j, src in enumerate(s.sources):
        n = info(src.model).num_layers
        start, end = src.layer_range
        if end > n:
            raise UserError(
                f"{where}.sources[{j}].layer_range: [{start}, {end}] is outside {src.model}, which has {n} layers; "
                f"use a range within [0, {n}]"
            )


def plan_stage(
    recipe: MergeRecipe, info: Callable[[str], ModelInfo], where: str = "recipe", vocabulary_size: int | None = None
) -> StagePlan:
    """Validate one mergekit-yaml recipe against its models and plan every output tensor.

    vocabulary_size: the output vocabulary's rows, for a recipe with a tokenizer setting: the models'
    vocabulary tensors may then differ along their vocabulary axis, and the output has this many rows."""
    method = get_method(recipe.merge_method)
    check_parameters(recipe, method)
    dtype = parse_dtype(recipe.dtype, "dtype")
    out_dtype = parse_dtype(recipe.out_dtype, "out_dtype")
    referenced = recipe.referenced_models()
    infos = {n: info(n) for n in referenced}
    first = infos[referenced[0]]
    arch = _one_architecture(infos, first, where)
    slices = _as_slices(recipe, info)
    for i, s in enumerate(slices):
        _check_slice(i, s, s.base_model or recipe.base_model, method, info, "slices" if recipe.slices else "models")

    planned: list[Job | None] = []

    def plan(out: WeightSpec, ins: list[WeightSpec], models: list[str], s: OutputSlice, t: float) -> None:
        planned.append(_plan_tensor(recipe, method, infos, arch.name, where, out, ins, models, s, t, vocabulary_size))

    # Names with ${num_layers} are the output's (mergekit fills a definition in with the output config).
    out_depth = sum(s.num_layers for s in slices)
    first_slice, last_slice = slices[0], slices[-1]
    for w in arch.pre_weights(out_depth):
        plan(w, [w] * len(first_slice.sources), [src.model for src in first_slice.sources], first_slice, 0.0)
    out_layer = 0
    for s in slices:
        depth = s.num_layers
        for offset in range(depth):
            t = layer_position(offset, depth)
            outs = arch.layer_weights(out_layer, out_depth)
            ins = [arch.layer_weights(src.layer_range[0] + offset, infos[src.model].num_layers) for src in s.sources]
            for k, w in enumerate(outs):
                plan(w, [i[k] for i in ins], [src.model for src in s.sources], s, t)
            out_layer += 1
    for w in arch.post_weights(out_depth):
        # mergekit pairs the last slice's models with as many inputs as the first slice has.
        models = [src.model for src in last_slice.sources][: len(first_slice.sources)]
        plan(w, [w] * len(models), models, last_slice, 0.0)
    jobs = [j for j in planned if j is not None]

    donor = infos[recipe.base_model] if recipe.base_model else first
    num_layers = out_layer if recipe.slices else donor.num_layers
    if num_layers != donor.num_layers:
        check_depth_writable(donor, num_layers, where)
    config = output_config(donor.config, arch, num_layers, recipe.out_dtype or recipe.dtype)
    if vocabulary_size is not None:
        config["vocab_size"] = vocabulary_size
    out_tensors = {}
    for j in jobs:
        in_dtypes = [infos[m].tensors[n].dtype for m, n in zip(j.models, j.tensors)]
        work = dtype or promoted_dtype(in_dtypes)
        out_tensors[j.name] = TensorInfo(j.shape, out_dtype or work)
    output = ModelInfo(name=recipe.name or "(merge)", config=config, tensors=out_tensors)
    return StagePlan(recipe, method, jobs, config, dtype, out_dtype, output)


def depth_change_refusal(config: dict, num_layers_key: str, num_layers: int) -> str | None:
    """Why mergekit 0.1.5 cannot write this config at `num_layers` layers; None when it can.

    mergekit writes a stack's config.json as the base's config object with the new depth, which
    transformers 5 validates on saving: a config that lists something per layer (`layer_types`)
    fails there, and mergekit writes nothing."""
    if not _lists_per_layer(config, config_value(config, num_layers_key)):
        return None  # nothing in it has the old depth's length: transformers' validation has nothing to refuse
    hf = hf_config(config)
    *parents, last = num_layers_key.split(".")
    node = hf
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, num_layers)
    try:
        hf.validate()
    except Exception as e:  # transformers' validation errors have no common type
        return str(e).strip().splitlines()[-1].strip()
    return None


def _lists_per_layer(node, num_layers) -> bool:
    """Whether a config holds a list of num_layers entries (`layer_types`, a per-layer window), at any depth."""
    if isinstance(node, dict):
        return any(_lists_per_layer(v, num_layers) for v in node.values())
    return isinstance(node, list) and len(node) == num_layers


def check_depth_writable(donor: ModelInfo, num_layers: int, where: str) -> None:
    """A stack mergekit could not write is refused before any work, in one line."""
    reason = depth_change_refusal(donor.config, donor.arch.num_layers_key, num_layers)
    if reason:
        raise UserError(
            f"{where}: the slices make {num_layers} layers, but mergekit 0.1.5 cannot write a {donor.arch.name} config "
            f"of {num_layers} layers from {donor.name}'s ({reason}); stack to {donor.num_layers} layers"
        )


def _one_architecture(infos: dict[str, ModelInfo], first: ModelInfo, where: str) -> Architecture:
    for n, i in infos.items():
        if i.arch is not first.arch:
            raise UserError(
                f"{where}: {n} is {i.config['architectures'][0]} but {first.name} is "
                f"{first.config['architectures'][0]}; merge models of one architecture"
            )
    return first.arch


def _plan_tensor(
    recipe: MergeRecipe,
    method: Method,
    infos: dict[str, ModelInfo],
    arch_name: str,
    where: str,
    out: WeightSpec,
    ins: list[WeightSpec],
    models: list[str],
    s: OutputSlice,
    t: float,
    vocabulary_size: int | None = None,
) -> Job | None:
    """One output tensor: which source tensors it reads and the method's parameters at position t.
    None for an optional tensor absent everywhere (a tied head), which mergekit does not write;
    as mergekit, a tied name does not count as present there, but is read where the name is absent."""
    base = s.base_model or recipe.base_model
    if out.optional and not any(n in infos[m].tensors for m, w in zip(models, ins) for n in (w.name, *w.aliases)):
        return None
    shared_levels = (s.parameters, recipe.parameters)
    shared = {p.name: resolve(p, shared_levels, out.name, t) for p in method.params if p.scope == "shared"}
    read_models, read_names, per_input = [], [], []
    for m, w in zip(models, ins):
        present = [n for n in w.stored_names() if n in infos[m].tensors]
        if not present:
            if out.optional:
                continue
            raise UserError(f"{where}: model {m} has no tensor {w.name}; it does not fit a {arch_name} merge")
        levels = [src.parameters for src in s.sources if src.model == m] + [s.parameters, recipe.parameters]
        per_input.append(
            {
                p.name: resolve(p, levels, w.name, t, model=m)
                for p in method.params
                if p.scope == "input" or (p.scope == "non_base" and m != base)
            }
        )
        read_models.append(m)
        read_names.append(present[0])
    shapes = {infos[m].tensors[n].shape for m, n in zip(read_models, read_names)}
    axis = out.vocabulary_axis
    if vocabulary_size is not None and axis is not None:  # rows are re-indexed onto the output vocabulary
        shapes = {(*shape[:axis], vocabulary_size, *shape[axis + 1 :]) for shape in shapes}
    if len(shapes) > 1:
        detail = ", ".join(f"{m}: {list(infos[m].tensors[n].shape)}" for m, n in zip(read_models, read_names))
        fix = "merge models of the same size"
        if axis is not None and len({shape[:axis] + shape[axis + 1 :] for shape in shapes}) == 1:
            fix = "the vocabularies differ: add `tokenizer_source: union` (or base, or a model) to the recipe"
        raise UserError(f"{where}: models do not fit together: {out.name} has shapes {detail}; {fix}")
    base_index = read_models.index(base) if (method.base != "ignored" and base in read_models) else None
    single = out.optional and len(read_models) == 1 and len(models) > 1 and method.passthrough_singleton
    if method.base == "required" and base_index is None and not single:
        raise UserError(f"{where}: {out.name} is missing from base model {base}; pick a base model that has it")
    return Job(
        name=out.name,
        models=read_models,
        tensors=read_names,
        base_index=base_index,
        shared=shared,
        per_input=per_input,
        shape=shapes.pop(),
        label=max(read_names),
        take_only_input=single,
        vocabulary_axis=axis,
        base_model=base,
    )


def promoted_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype mergekit computes in when no `dtype:` is given: the inputs' promoted dtype."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out
