"""A Mixtral built from dense Llama/Mistral experts, in memory, as mergekit-moe 0.1.5 writes it.

The output, tensor by tensor (names and layout exactly as mergekit-moe writes them to disk,
which is transformers 5's in-memory layout of Mixtral):

- everything outside the MLPs — embeddings, attention, norms, lm_head — is base_model's,
  cast to the output dtype (the base's own MLPs are not used);
- layer i's MLP becomes one expert per entry of `experts:`, fused across experts:
  `model.layers.i.mlp.experts.gate_up_proj`  [E, 2I, H]  = expert e's gate_proj over its up_proj,
  `model.layers.i.mlp.experts.down_proj`     [E, H, I]  = expert e's down_proj;
  an expert's `noise_scale` adds N(0, noise_scale) to its three tensors, `residual_scale`
  scales its down_proj;
- `model.layers.i.mlp.gate.weight` [E, H], the router, from search/engine/moe_gates.py.

Random draws (random gates first, then each expert's noise, layer by layer, expert by expert,
gate_proj / down_proj / up_proj) come from one CPU generator seeded with `seed`, in the order
mergekit draws them from torch's global generator after `--random-seed seed`: the same seed
gives the same router and noise as `mergekit-moe --random-seed seed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import transformers

from search.engine.errors import UserError
from search.engine.hf_config import hf_config
from search.engine.moe_gates import gate_vectors

if TYPE_CHECKING:
    from search.engine.recipe import Expert, MoERecipe
    from search.engine.sources import SourceModel

# Mixtral's attention and norms are Mistral's, which are Llama's: only these bases fit.
MIXTRAL_SOURCE_TYPES = ("llama", "mistral")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}

# mergekit reads each expert's projections in this order; it fixes which noise each one draws.
EXPERT_PROJECTIONS = ("gate_proj", "down_proj", "up_proj")


def build_moe(
    recipe: MoERecipe,
    load: Callable[[str], SourceModel],
    seed: int | None,
    device: str,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, output tensors by name) of the Mixtral that mergekit-moe builds.

    Tensors taken unchanged from the base (same dtype and device) are the base's own tensors,
    not copies: do not write into them. With `seed=None`, random draws use torch's global
    generator, as mergekit-moe does without `--random-seed`.
    """
    check_recipe(recipe)
    base = load(recipe.base_model)
    experts = [load(e.source_model) for e in recipe.experts]
    check_sources(recipe, base, experts)

    out_dtype = output_dtype(recipe, base.config)
    config = mixtral_config(base.config, len(experts), recipe.experts_per_token, out_dtype)
    generator = None if seed is None else torch.Generator().manual_seed(seed)

    gates = gate_vectors(recipe.gate_mode, recipe.experts, base, generator, device)
    # The base's tensors in the output dtype are converted once per source and then shared.
    tensors = {name: cast(base.tensor(name, out_dtype), None, device) for name in shared_weight_names(base)}
    for layer in range(base.config["num_hidden_layers"]):
        mlps = [expert_mlp(src, spec, layer, generator) for src, spec in zip(experts, recipe.experts)]
        gate_up, down = fuse_experts(mlps, out_dtype, device)
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    for layer, router in enumerate(gates):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = cast(router, out_dtype, device).contiguous()
    return config, tensors


# ---- the pieces ---------------------------------------------------------------------


def shared_weight_names(base: SourceModel) -> Iterator[str]:
    """The base's tensors outside the MLPs, in checkpoint order; lm_head only if stored (else tied)."""
    yield "model.embed_tokens.weight"
    for i in range(base.config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{proj}.weight"
        yield p + "post_attention_layernorm.weight"
    yield "model.norm.weight"
    if "lm_head.weight" in base.tensors:
        yield "lm_head.weight"


def cast(t: torch.Tensor, dtype: torch.dtype | None, device: str) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype)  # the same tensor when nothing changes


def expert_mlp(
    source: SourceModel, spec: Expert, layer: int, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """One expert's three MLP projections at `layer`, with its noise and residual scale applied."""
    out = {}
    for proj in EXPERT_PROJECTIONS:
        t = source.tensors[f"model.layers.{layer}.mlp.{proj}.weight"]
        if spec.noise_scale is not None:
            # Drawn on the CPU in the tensor's dtype, as mergekit's randn_like on its CPU copy.
            noise = torch.randn(t.shape, dtype=t.dtype, generator=generator) * spec.noise_scale
            t = t + noise.to(t.device)
        if proj == "down_proj" and spec.residual_scale is not None:
            t = t * spec.residual_scale
        out[proj] = t
    return out


def fuse_experts(
    mlps: list[dict[str, torch.Tensor]], dtype: torch.dtype | None, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the experts' projections: gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I]."""
    if dtype is None:  # no dtype anywhere: mergekit's torch.stack promotes mixed dtypes
        dtype = mlps[0]["gate_proj"].dtype
        for m in mlps:
            for t in m.values():
                dtype = torch.promote_types(dtype, t.dtype)
    inter, hidden = mlps[0]["gate_proj"].shape
    gate_up = torch.empty((len(mlps), 2 * inter, hidden), dtype=dtype, device=device)
    down = torch.empty((len(mlps), hidden, inter), dtype=dtype, device=device)
    for e, m in enumerate(mlps):
        gate_up[e, :inter].copy_(m["gate_proj"])
        gate_up[e, inter:].copy_(m["up_proj"])
        down[e].copy_(m["down_proj"])
    return gate_up, down


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


def mixtral_config(base_config: dict, num_experts: int, experts_per_token: int, dtype: torch.dtype | None) -> dict:
    """config.json of the output: the base's config read as Mixtral's, plus the MoE fields."""
    cfg = hf_config(base_config)
    if not isinstance(cfg, transformers.MistralConfig):
        # A Llama config read as Mistral's: its keys carry over, and no sliding window.
        as_mistral = transformers.MistralConfig(**cfg.to_dict())
        as_mistral.sliding_window = None
        as_mistral.max_position_embeddings = cfg.max_position_embeddings
        cfg = as_mistral
    out = transformers.MixtralConfig(**cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = num_experts
    out.num_experts_per_tok = experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    return json.loads(out.to_json_string(use_diff=True))


# ---- what mergekit-moe refuses, refused with one line ------------------------------


def check_recipe(recipe: MoERecipe) -> None:
    """mergekit-moe's own checks on a config (its is_bad_config and Mixtral's support test)."""
    if recipe.architecture and not "mixtral".startswith(recipe.architecture.lower()):
        raise UserError(
            f"architecture: {recipe.architecture!r} is not built by mergesearch; remove it or write mixtral"
        )
    if recipe.shared_experts:
        raise UserError("shared_experts: a Mixtral has no shared experts; remove shared_experts")
    k, n = recipe.experts_per_token, len(recipe.experts)
    if k < 1:
        raise UserError(f"experts_per_token: is {k}; set it to 1 or more")
    if n < k:
        raise UserError(
            f"experts: {n} listed but experts_per_token is {k}; list at least {k} experts or lower experts_per_token"
        )
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


def check_sources(recipe: MoERecipe, base: SourceModel, experts: list[SourceModel]) -> None:
    """Every model is Llama or Mistral, of one type, and each expert's MLPs fit the base."""
    base_type = base.config.get("model_type")
    if base_type not in MIXTRAL_SOURCE_TYPES:
        raise UserError(
            f"base_model: {base.name} is a {base_type} model; a Mixtral is built from llama or mistral models only"
        )
    for i, (spec, src) in enumerate(zip(recipe.experts, experts)):
        src_type = src.config.get("model_type")
        if src_type != base_type:
            raise UserError(
                f"experts[{i}].source_model: {src.name} is a {src_type} model but base_model is {base_type}; "
                "use experts of the base's architecture"
            )
    for name in shared_weight_names(base):
        if name not in base.tensors:
            raise UserError(f"base_model: {base.name} lacks tensor {name}; point base_model at a complete checkpoint")
    num_layers = base.config["num_hidden_layers"]
    hidden, inter = base.config["hidden_size"], base.config["intermediate_size"]
    expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i, src in enumerate(experts):
        for layer in range(num_layers):
            for proj, shape in expected.items():
                name = f"model.layers.{layer}.mlp.{proj}.weight"
                t = src.tensors.get(name)
                if t is None:
                    raise UserError(
                        f"experts[{i}].source_model: {src.name} has no {name} (the base has {num_layers} layers); "
                        "use experts at least as deep as the base"
                    )
                if tuple(t.shape) != shape:
                    raise UserError(
                        f"experts[{i}].source_model: {src.name}'s {name} is {list(t.shape)}, "
                        f"the base needs {list(shape)}; use experts of the base's width (hidden_size, intermediate_size)"
                    )
