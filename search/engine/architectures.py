"""Tensor naming per architecture: which tensors come before the layers, in each
layer, and after them, as mergekit 0.1.5 plans them.

A merge is planned over these names: `pre` tensors (embeddings) take their
inputs from the first slice, `layer` tensors from each slice's layers in turn,
`post` tensors (final norm, head) from the last slice. The lists follow
mergekit's architecture definitions, so a tensor mergekit writes is a tensor we
write, and one it leaves out (a tied head) we leave out too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from search.engine.errors import UserError


@dataclass(frozen=True)
class WeightSpec:
    name: str  # may contain {i}, the layer index
    optional: bool = False  # may be absent from a checkpoint (a tied head)
    tied_names: tuple[str, ...] = ()  # where to read it from when absent (mergekit's tied_names)
    vocabulary_axis: int | None = None

    def at(self, layer: int) -> "WeightSpec":
        return WeightSpec(self.name.format(i=layer), self.optional, self.tied_names, self.vocabulary_axis)


@dataclass(frozen=True)
class Architecture:
    name: str  # our short name: llama, mistral, ...
    hf_architectures: tuple[str, ...]  # config.json "architectures" values it covers
    pre: tuple[WeightSpec, ...]
    layer: tuple[WeightSpec, ...]
    post: tuple[WeightSpec, ...]
    num_layers_key: str = "num_hidden_layers"
    extra: dict = field(default_factory=dict)

    def layer_weights(self, index: int) -> list[WeightSpec]:
        return [w.at(index) for w in self.layer]

    def num_layers(self, config: dict) -> int:
        return int(config[self.num_layers_key])

    def all_names(self, num_layers: int) -> list[str]:
        names = [w.name for w in self.pre]
        for i in range(num_layers):
            names += [w.name for w in self.layer_weights(i)]
        return names + [w.name for w in self.post]


def _layer(*suffixes: str) -> tuple[WeightSpec, ...]:
    return tuple(WeightSpec(f"model.layers.{{i}}.{s}") for s in suffixes)


_EMBED = WeightSpec("model.embed_tokens.weight", vocabulary_axis=0)
_NORM = WeightSpec("model.norm.weight")
_TIED_HEAD = WeightSpec("lm_head.weight", optional=True, tied_names=("model.embed_tokens.weight",), vocabulary_axis=0)

# The attention half of a Llama-style layer, in mergekit's order; Mixtral shares it.
_LLAMA_ATTENTION = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
)
_LLAMA_LAYER = _layer(*_LLAMA_ATTENTION, "mlp.up_proj.weight", "mlp.gate_proj.weight", "mlp.down_proj.weight")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("llama", ("LlamaForCausalLM", "LLaMaForCausalLM"), (_EMBED,), _LLAMA_LAYER, (_NORM, _TIED_HEAD)),
        Architecture("mistral", ("MistralForCausalLM",), (_EMBED,), _LLAMA_LAYER, (_NORM, _TIED_HEAD)),
        # Gemma always ties its head to the embeddings: mergekit writes no lm_head.
        Architecture("gemma", ("GemmaForCausalLM",), (_EMBED,), _LLAMA_LAYER, (_NORM,)),
        Architecture(
            "qwen2",
            ("Qwen2ForCausalLM",),
            (_EMBED,),
            _layer(
                "input_layernorm.weight",
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "post_attention_layernorm.weight",
                "self_attn.k_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.o_proj.weight",
                "self_attn.q_proj.bias",
                "self_attn.q_proj.weight",
                "self_attn.v_proj.bias",
                "self_attn.v_proj.weight",
            ),
            (_NORM, _TIED_HEAD),
        ),
        Architecture(
            "phi",  # phi-2 as transformers names it (PhiForCausalLM)
            ("PhiForCausalLM",),
            (_EMBED,),
            _layer(
                "input_layernorm.bias",
                "input_layernorm.weight",
                "self_attn.dense.bias",
                "self_attn.dense.weight",
                "self_attn.q_proj.bias",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.bias",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.bias",
                "self_attn.v_proj.weight",
                "mlp.fc1.bias",
                "mlp.fc1.weight",
                "mlp.fc2.bias",
                "mlp.fc2.weight",
            ),
            (
                WeightSpec("lm_head.bias", vocabulary_axis=0),
                WeightSpec("lm_head.weight", vocabulary_axis=0),
                WeightSpec("model.final_layernorm.bias"),
                WeightSpec("model.final_layernorm.weight"),
            ),
        ),
        # Mixtral as transformers 5 holds it in memory: experts fused per layer.
        Architecture(
            "mixtral",
            ("MixtralForCausalLM",),
            (_EMBED,),
            _layer(*_LLAMA_ATTENTION, "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
            (_NORM, _TIED_HEAD),
        ),
    ]
}

_BY_HF_NAME = {hf: a for a in ARCHITECTURES.values() for hf in a.hf_architectures}


def architecture_of(config: dict, where: str = "model") -> Architecture:
    """The architecture a config.json describes; UserError for one we do not know."""
    names = config.get("architectures") or []
    if len(names) != 1:
        raise UserError(f"{where}: config.json must name exactly one architecture (got {names}); fix its `architectures`")
    arch = _BY_HF_NAME.get(names[0])
    if arch is None:
        known = ", ".join(sorted(_BY_HF_NAME))
        raise UserError(f"{where}: architecture {names[0]} is not supported; use a model of one of: {known}")
    return arch


def output_config(base_config: dict, num_layers: int, dtype: str | None) -> dict:
    """config.json of the merge, as mergekit writes it: the base's, with the new depth and dtype."""
    out = copy.deepcopy(base_config)
    arch = architecture_of(out)
    out[arch.num_layers_key] = num_layers
    # transformers 5 reads an old `torch_dtype` and writes it back as `dtype`.
    old = out.pop("torch_dtype", None)
    if dtype:
        out["dtype"] = dtype
    elif old is not None and "dtype" not in out:
        out["dtype"] = old
    return out
