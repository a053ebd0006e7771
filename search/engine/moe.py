"""A mixture of experts built from dense models, in memory, as mergekit-moe 0.1.5 builds it.

mergekit-moe writes one of four layouts (search/engine/moe_layouts.py): Mixtral, DeepSeek MoE,
Qwen MoE (Qwen2-MoE) and Qwen3 MoE. It picks as its `select_output_arch` does: of the layouts
whose name starts with the recipe's `architecture:` (all when it is absent), those that fit the
models; Mixtral if it is one of them, else the first in that order. What fits:

- Mixtral:      no shared experts; Llama or Mistral models;
- DeepSeek MoE: at most one shared expert, without prompts (it is not gated); Llama or Mistral;
- Qwen MoE:     exactly one shared expert, with prompts unless gate_mode is random;
                Llama, Mistral or Qwen2 models;
- Qwen3 MoE:    no shared experts; Qwen3 models.

Every model (base, experts, shared experts) is of one model_type in all of them.

Random draws (random gates first, for the experts and then the gated shared experts, then each
expert's noise in the layout's order) come from one CPU generator seeded with `seed`, in the
order mergekit draws them from torch's global generator after `--random-seed seed`: the same
seed gives the same routers and noise as `mergekit-moe --random-seed seed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from search.engine.errors import UserError
from search.engine.hf_config import hf_config
from search.engine.moe_gates import gate_vectors
from search.engine.moe_layouts import LAYOUTS, MoEInputs, mlp_name

if TYPE_CHECKING:
    from search.engine.recipe import Expert, MoERecipe
    from search.engine.sources import SourceModel

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}

# model types each layout builds from
LAYOUT_MODEL_TYPES = {
    "Mixtral": ("llama", "mistral"),
    "DeepSeek MoE": ("llama", "mistral"),
    "Qwen MoE": ("llama", "mistral", "qwen2"),
    "Qwen3 MoE": ("qwen3",),
}


def build_moe(
    recipe: MoERecipe,
    load: Callable[[str], SourceModel],
    seed: int | None,
    device: str,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, output tensors by name) of the MoE that mergekit-moe builds.

    Tensors taken unchanged from the base (same dtype and device) are the base's own tensors,
    not copies: do not write into them. With `seed=None`, random draws use torch's global
    generator, as mergekit-moe does without `--random-seed`.
    """
    check_recipe(recipe)
    base = load(recipe.base_model)
    experts = [load(e.source_model) for e in recipe.experts]
    shared = [load(e.source_model) for e in recipe.shared_experts or []]
    layout = select_layout(recipe, base, experts, shared)
    listed = {recipe.base_model, *(e.source_model for e in recipe.experts)}
    for i, e in enumerate(recipe.shared_experts or []):
        if e.source_model not in listed:
            raise UserError(
                f"shared_experts[{i}].source_model: {e.source_model} is neither the base model nor an expert, and "
                "mergekit-moe 0.1.5 reads a shared expert only from one of those; use one of them"
            )
    check_sources(recipe, base, experts + shared)

    generator = None if seed is None else torch.Generator().manual_seed(seed)
    gated = list(recipe.experts)
    shared_specs = recipe.shared_experts or []
    if any(e.positive_prompts for e in shared_specs) or recipe.gate_mode in ("random", "uniform_random"):
        gated += shared_specs  # mergekit draws (or computes) a gate for them too, used or not
    gates = gate_vectors(recipe.gate_mode, gated, base, generator, device)
    inputs = MoEInputs(
        recipe=recipe, base=base, experts=experts, shared=shared, out_dtype=output_dtype(recipe, base.config),
        routers=gates[:, : len(experts)], shared_routers=gates[:, len(experts) :], generator=generator, device=device,
    )  # fmt: skip
    return LAYOUTS[layout](inputs)


def dtype_from_name(name: str, field: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise UserError(f"{field}: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def output_dtype(recipe: MoERecipe, base_config: dict) -> torch.dtype | None:
    """The recipe's dtype, else the base's config dtype, else None (tensors keep their own)."""
    if recipe.dtype:
        return dtype_from_name(recipe.dtype, "dtype")
    dtype = hf_config(base_config).dtype
    if isinstance(dtype, str):
        return dtype_from_name(dtype, "base_model's config.json dtype")
    return dtype


# ---- what mergekit-moe refuses, refused with one line ------------------------------


def check_recipe(recipe: MoERecipe) -> None:
    """mergekit-moe's own checks on a config (its is_bad_config), and an `architecture:` it knows."""
    if recipe.architecture and not any(n.lower().startswith(recipe.architecture.lower()) for n in LAYOUTS):
        raise UserError(
            f"architecture: {recipe.architecture!r} names no layout mergekit-moe 0.1.5 writes; "
            f"use one of {', '.join(LAYOUTS)}, or remove it"
        )
    k, n = recipe.experts_per_token, len(recipe.experts)
    if k < 1:
        raise UserError(f"experts_per_token: is {k}; set it to 1 or more")
    if n < k:
        raise UserError(
            f"experts: {n} listed but experts_per_token is {k}; list at least {k} experts or lower experts_per_token"
        )
    shared = recipe.shared_experts or []
    if any(bool(e.positive_prompts) != bool(shared[0].positive_prompts) for e in shared):
        raise UserError("shared_experts: give every shared expert positive_prompts, or none of them")
    if recipe.gate_mode == "random":
        return  # mergekit checks nothing further for random gates
    for i, e in enumerate(recipe.experts):
        if not e.positive_prompts:
            raise UserError(
                f"experts[{i}].positive_prompts: gate_mode {recipe.gate_mode} needs prompts for every expert; "
                "add prompts of what should be routed to it, or use gate_mode random"
            )

    def prompts(e: Expert) -> tuple:
        return tuple(e.positive_prompts), tuple(e.negative_prompts or [])

    if all(prompts(e) == prompts(recipe.experts[0]) for e in recipe.experts[1:]):
        raise UserError(
            "experts: every expert has the same prompts, so routing cannot tell them apart; "
            "give each its own positive_prompts"
        )
    if all(e.source_model == recipe.experts[0].source_model for e in recipe.experts[1:]):
        raise UserError(
            f"experts: every expert is {recipe.experts[0].source_model}, which gives the base model at more cost; "
            "list different source_models"
        )


def layout_refusal(layout: str, recipe: MoERecipe, model_type: str) -> str | None:
    """Why a layout does not fit these models (mergekit's supports_config); None when it does."""
    shared = recipe.shared_experts or []
    if layout in ("Mixtral", "Qwen3 MoE") and shared:
        return "no shared experts"
    if layout == "DeepSeek MoE" and (len(shared) > 1 or any(e.positive_prompts or e.negative_prompts for e in shared)):
        return "at most one shared expert, without prompts"
    if layout == "Qwen MoE":
        if len(shared) != 1:
            return "exactly one shared expert"
        if recipe.gate_mode != "random" and not shared[0].positive_prompts:
            return "prompts for its shared expert unless gate_mode is random"
    if model_type not in LAYOUT_MODEL_TYPES[layout]:
        return f"{' or '.join(LAYOUT_MODEL_TYPES[layout])} models"
    return None


def select_layout(recipe: MoERecipe, base: SourceModel, experts: list[SourceModel], shared: list[SourceModel]) -> str:
    """The layout mergekit-moe writes for this recipe and these models; UserError when none fits."""
    base_type = base.config.get("model_type")
    fields = [(f"experts[{i}]", s) for i, s in enumerate(experts)] + [(f"shared_experts[{i}]", s) for i, s in enumerate(shared)]
    for field, src in fields:
        if src.config.get("model_type") != base_type:
            raise UserError(
                f"{field}.source_model: {src.name} is a {src.config.get('model_type')} model but base_model is "
                f"{base_type}; use experts of the base's architecture"
            )
    named = [n for n in LAYOUTS if not recipe.architecture or n.lower().startswith(recipe.architecture.lower())]
    reasons = {n: layout_refusal(n, recipe, base_type) for n in named}
    fits = [n for n in named if reasons[n] is None]
    if not fits:
        why = "; ".join(f"{n} needs {r}" for n, r in reasons.items())
        field = "shared_experts" if recipe.shared_experts else "base_model"
        raise UserError(f"{field}: no MoE layout of mergekit-moe 0.1.5 fits {base.name}, a {base_type} model ({why})")
    return "Mixtral" if "Mixtral" in fits else fits[0]


def check_sources(recipe: MoERecipe, base: SourceModel, experts: list[SourceModel]) -> None:
    """Each expert (shared ones last) has MLPs of the base's shape in every layer of the base."""
    num_layers = base.config["num_hidden_layers"]
    hidden, inter = base.config["hidden_size"], base.config["intermediate_size"]
    expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    fields = [f"experts[{i}]" for i in range(len(recipe.experts))]
    fields += [f"shared_experts[{i}]" for i in range(len(recipe.shared_experts or []))]
    for field, src in zip(fields, experts):
        for layer in range(num_layers):
            for proj, shape in expected.items():
                name = mlp_name(layer, proj)
                t = src.tensors.get(name)
                if t is None:
                    raise UserError(
                        f"{field}.source_model: {src.name} has no {name} (the base has {num_layers} layers); "
                        "use experts at least as deep as the base"
                    )
                if tuple(t.shape) != shape:
                    raise UserError(
                        f"{field}.source_model: {src.name}'s {name} is {list(t.shape)}, "
                        f"the base needs {list(shape)}; use experts of the base's width (hidden_size, intermediate_size)"
                    )
