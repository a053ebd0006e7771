"""The four MoE layouts mergekit-moe 0.1.5 writes, tensor by tensor, config and all.

Every layout keeps the base model's tensors outside the MLPs (cast to the output dtype; the
base's own MLPs are not used), turns each layer's MLP into one expert per entry of `experts:`,
and adds a router per layer (`model.layers.i.mlp.gate.weight` [E, H], from
search/engine/moe_gates.py). Which base tensors exist is read from mergekit's definition of the
layout's dense architecture, as mergekit reads it. They differ in how experts are stored:

- Mixtral (Llama/Mistral experts) and Qwen3-MoE (Qwen3 experts): fused per layer,
  `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows over up rows) and `mlp.experts.down_proj`
  [E, H, I] — transformers 5's in-memory layout, which mergekit writes to disk;
- Qwen2-MoE (Llama/Mistral/Qwen2 experts, exactly one shared expert): one tensor per expert,
  `mlp.experts.N.{gate,up,down}_proj.weight`, the shared expert's `mlp.shared_expert.*` and its
  gate `mlp.shared_expert_gate.weight` [1, H]; attention biases the base lacks are zeros;
- DeepSeek-MoE (Llama/Mistral experts, at most one shared expert, ungated): one tensor per
  expert, the shared one as `mlp.shared_experts.*`; its config names remote code
  (deepseek-ai/deepseek-moe-16b-base), which transformers 5 does not have.

An expert's `noise_scale` adds N(0, noise_scale) to each of its projections (drawn in the
tensor's dtype, one generator, in the order mergekit reads the projections, which differs by
layout), and `residual_scale` scales its down_proj.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import transformers

from search.engine.architectures import Architecture, WeightSpec
from search.engine.errors import UserError
from search.engine.hf_config import hf_config
from search.engine.mergekit_definitions import architecture_of, definition_named

if TYPE_CHECKING:
    from search.engine.recipe import Expert, MoERecipe
    from search.engine.sources import SourceModel


@dataclass
class MoEInputs:
    recipe: MoERecipe
    base: SourceModel
    experts: list[SourceModel]
    shared: list[SourceModel]  # the shared experts' models (shared_experts:)
    out_dtype: torch.dtype | None
    routers: torch.Tensor  # [layers, experts, hidden]
    shared_routers: torch.Tensor  # [layers, shared experts with gates, hidden]
    generator: torch.Generator | None
    device: str

    @property
    def num_layers(self) -> int:
        return self.base.config["num_hidden_layers"]


def cast(t: torch.Tensor, dtype: torch.dtype | None, device: str) -> torch.Tensor:
    return t.to(device=device, dtype=dtype or t.dtype)  # the same tensor when nothing changes


def noisy(t: torch.Tensor, spec: Expert, residual: bool, generator: torch.Generator | None) -> torch.Tensor:
    """An expert's tensor with its noise and (down_proj) residual scale, as mergekit applies them."""
    if spec.noise_scale is not None:
        # Drawn on the CPU in the tensor's dtype, as mergekit's randn_like on its CPU copy.
        noise = torch.randn(t.shape, dtype=t.dtype, generator=generator) * spec.noise_scale
        t = t + noise.to(t.device)
    if residual and spec.residual_scale is not None:
        t = t * spec.residual_scale
    return t


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def stored(src: SourceModel, w: WeightSpec, with_tied: bool, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A weight under its name or an alias (or, with_tied, a tied name), as mergekit's loader finds it,
    in `dtype` (converted once per source and kept: every build shares it)."""
    names = w.stored_names() if with_tied else (w.name, *w.aliases)
    name = next((n for n in names if n in src.tensors), None)
    return None if name is None else src.tensor(name, dtype)


def base_tensors(p: MoEInputs, dense: Architecture) -> dict[str, torch.Tensor]:
    """The base's tensors outside the MLPs by the `dense` definition, in the output dtype; an optional
    one (a tied head) only where stored under its own name."""
    out = {}
    for w in dense.all_weights(p.num_layers):
        if ".mlp." in w.name:
            continue
        t = stored(p.base, w, not w.optional, p.out_dtype)
        if t is None:
            if w.optional:
                continue
            raise UserError(f"base_model: {p.base.name} lacks tensor {w.name}; point base_model at a complete checkpoint")
        out[w.name] = cast(t, None, p.device)
    return out


def fuse_experts(mlps: list[dict[str, torch.Tensor]], dtype: torch.dtype | None, device: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def fused_tensors(p: MoEInputs, dense: Architecture, order: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A fused layout: the base's tensors, each layer's experts fused, the routers.
    `order`: the projections in the order mergekit reads (and so draws noise for) them."""
    tensors = base_tensors(p, dense)
    for layer in range(p.num_layers):
        mlps = [
            {proj: noisy(src.tensors[mlp_name(layer, proj)], spec, proj == "down_proj", p.generator) for proj in order}
            for src, spec in zip(p.experts, p.recipe.experts)
        ]
        gate_up, down = fuse_experts(mlps, p.out_dtype, p.device)
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gate_up
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = down
    for layer in range(p.num_layers):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = cast(p.routers[layer], p.out_dtype, p.device).contiguous()
    return tensors


def unfused_experts(p: MoEInputs, w: WeightSpec, shared_infix: str) -> dict[str, torch.Tensor]:
    """One MLP weight of every expert (then of the shared expert) under its own name."""
    out = {}
    residual = "down_proj" in w.name
    for idx, (src, spec) in enumerate(zip(p.experts, p.recipe.experts)):
        t = noisy(src.tensors[w.name], spec, residual, p.generator)
        out[w.name.replace(".mlp.", f".mlp.experts.{idx}.")] = cast(t, p.out_dtype, p.device)
    for src, spec in zip(p.shared, p.recipe.shared_experts or []):
        t = noisy(src.tensors[w.name], spec, residual, p.generator)
        out[w.name.replace(".mlp.", f".mlp.{shared_infix}.")] = cast(t, p.out_dtype, p.device)
    return out


def _config_json(config: transformers.PretrainedConfig) -> dict:
    return json.loads(config.to_json_string(use_diff=True))  # what save_pretrained writes


# ---- the layouts ------------------------------------------------------------------


def mixtral(p: MoEInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg = hf_config(p.base.config)
    if not isinstance(cfg, transformers.MistralConfig):
        # A Llama config read as Mistral's: its keys carry over, and no sliding window.
        as_mistral = transformers.MistralConfig(**cfg.to_dict())
        as_mistral.sliding_window = None
        as_mistral.max_position_embeddings = cfg.max_position_embeddings
        cfg = as_mistral
    out = transformers.MixtralConfig(**cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(p.experts)
    out.num_experts_per_tok = p.recipe.experts_per_token
    out.sliding_window = None
    out.dtype = p.out_dtype
    return _config_json(out), fused_tensors(p, definition_named("MistralForCausalLM"), ("gate_proj", "down_proj", "up_proj"))


def qwen3_moe(p: MoEInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    out = transformers.Qwen3MoeConfig(**hf_config(p.base.config).to_dict())
    out.architectures = ["Qwen3MoeForCausalLM"]
    out.num_experts = len(p.experts)
    out.num_experts_per_tok = p.recipe.experts_per_token
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.moe_intermediate_size = out.intermediate_size
    if p.out_dtype is not None:
        out.dtype = p.out_dtype
    return _config_json(out), fused_tensors(p, definition_named("Qwen3ForCausalLM"), ("gate_proj", "up_proj", "down_proj"))


def qwen2_moe(p: MoEInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    out = transformers.Qwen2MoeConfig(**hf_config(p.base.config).to_dict())
    out.architectures = ["Qwen2MoeForCausalLM"]
    out.num_experts = len(p.experts)
    out.num_experts_per_tok = p.recipe.experts_per_token
    out.decoder_sparse_step = 1
    out.norm_topk_prob = True
    out.sliding_window = None
    out.use_sliding_window = False
    out.shared_expert_intermediate_size = out.intermediate_size
    out.moe_intermediate_size = out.intermediate_size
    if p.out_dtype is not None:
        out.dtype = p.out_dtype
    tensors = {}
    for w in definition_named("Qwen2ForCausalLM").all_weights(p.num_layers):
        if ".mlp." in w.name:
            tensors.update(unfused_experts(p, w, "shared_expert"))
            continue
        t = stored(p.base, w, False, p.out_dtype)
        if t is None and w.name.endswith("_proj.bias"):
            # Qwen2 attention has q/k/v biases; a Llama or Mistral base has none: zeros, as mergekit writes
            head_dim = out.hidden_size // out.num_attention_heads
            kv = w.name.endswith(("k_proj.bias", "v_proj.bias"))
            t = torch.zeros(head_dim * (out.num_key_value_heads if kv else out.num_attention_heads), dtype=p.out_dtype)
        elif t is None:
            if w.optional:
                continue
            raise UserError(f"base_model: {p.base.name} lacks tensor {w.name}; point base_model at a complete checkpoint")
        tensors[w.name] = cast(t, p.out_dtype, p.device)
    for layer in range(p.num_layers):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = cast(p.routers[layer], p.out_dtype, p.device).contiguous()
        shared_gate = cast(p.shared_routers[layer], p.out_dtype, p.device).contiguous()
        tensors[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = shared_gate
    return _config_json(out), tensors


# Where the DeepSeek-MoE code lives that its config names (transformers 5 has no DeepSeek-MoE v1).
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base"


def deepseek_moe(p: MoEInputs) -> tuple[dict, dict[str, torch.Tensor]]:
    # mergekit-moe also writes `_name_or_path`, the base's folder on the machine that merged it; a published
    # config names no folder of this machine (search/engine/output.py leaves it out)
    config = hf_config(p.base.config).to_dict()
    config.pop("_name_or_path", None)
    shared = len(p.shared)
    config.update(
        architectures=["DeepseekForCausalLM"], model_type="deepseek", n_routed_experts=len(p.experts),
        n_shared_experts=shared or None, num_experts_per_tok=p.recipe.experts_per_token, first_k_dense_replace=0,
        moe_layer_freq=1, scoring_func="softmax", norm_topk_prob=True, moe_intermediate_size=config["intermediate_size"],
        auto_map={
            "AutoConfig": f"{DEEPSEEK_CODE}--configuration_deepseek.DeepseekConfig",
            "AutoModel": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekForCausalLM",
        },
    )  # fmt: skip
    if p.out_dtype is not None:
        config["torch_dtype"] = str(p.out_dtype).removeprefix("torch.")
    dense = architecture_of(p.base.config, "base_model")  # the base's own definition, as mergekit reads it
    tensors = base_tensors(p, dense)
    for w in dense.all_weights(p.num_layers):
        if ".mlp." in w.name:
            tensors.update(unfused_experts(p, w, "shared_experts"))
    for layer in range(p.num_layers):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = cast(p.routers[layer], p.out_dtype, p.device).contiguous()
    return json.loads(json.dumps(config)), tensors


# mergekit-moe's output architectures by name, in the order it tries them
LAYOUTS = {"Mixtral": mixtral, "DeepSeek MoE": deepseek_moe, "Qwen MoE": qwen2_moe, "Qwen3 MoE": qwen3_moe}
