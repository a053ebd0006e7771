"""What a space needs to know about a model, read from its config.json alone (no torch).

Depth bounds every layer index a space samples; it is read from the config key that
mergekit's definition of the architecture names (`n_layer` for GPT-2), and a model
without a usable definition is refused here, before anything starts. Parameter
counts, computed from the config's sizes, let a `max_params` constraint reject a
candidate before it is built. Counts follow the transformers modules of each family
(llama, mistral, qwen2, gemma, phi), tied embeddings counted once, as
`model.num_parameters()` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from search.engine.errors import UserError
from search.engine.architectures import config_value
from search.engine.mergekit_definitions import find_definition

# model_type -> the class transformers builds, for configs without `architectures`.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "phi": "PhiForCausalLM",
}

# The two projections that write into the residual stream: scaled to 0, a copied
# block adds nothing and the model is unchanged (LLaMA Pro's identity blocks).
_RESIDUAL_OUTPUTS = {
    "phi": ("dense", "fc2"),
    **{t: ("o_proj", "down_proj") for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}

# Defaults of the transformers config classes, for config.json files that omit a field.
_TIED_BY_DEFAULT = {"gemma"}

# Where a config.json states the width, by family (GPT-2 and StarCoder name it n_embd).
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")


@dataclass(frozen=True)
class ModelInfo:
    """One model's shape. Parameter counts are None for a family whose modules we do not know."""

    name: str
    model_type: str  # config.json's model_type: llama, mistral, qwen2, gemma, phi, ...
    architecture: str  # e.g. LlamaForCausalLM
    num_layers: int
    hidden_size: int
    vocab_size: int | None = None
    attn_params: int | None = None  # per layer: q, k, v, output projection (+ biases, qk norms)
    mlp_params: int | None = None  # per layer
    norm_params: int | None = None  # per layer
    outside_params: int | None = None  # embeddings, final norm, lm_head (once when tied)
    # The config lists something per layer (`layer_types`): mergekit 0.1.5 cannot write it at another
    # depth (transformers 5 refuses the config), so stacks and expansions of it are refused.
    fixed_depth: bool = False

    @property
    def params_per_layer(self) -> int | None:
        if self.attn_params is None:
            return None
        return self.attn_params + self.mlp_params + self.norm_params

    @property
    def total_params(self) -> int | None:
        if self.attn_params is None:
            return None
        return self.outside_params + self.num_layers * self.params_per_layer

    @property
    def residual_outputs(self) -> tuple[str, str] | None:
        """Filter names of the attention output and MLP output projections, or None if unknown."""
        return _RESIDUAL_OUTPUTS.get(self.model_type)

    def with_layers(self, num_layers: int, name: str | None = None) -> "ModelInfo":
        """The same model cut or stacked to another depth (a passthrough stage's output)."""
        return replace(self, num_layers=num_layers, name=name or self.name)

    @classmethod
    def from_config(cls, config: dict, name: str) -> "ModelInfo":
        where = f"models.{name} config.json"
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            raise UserError(f"{where}: no model_type; is this a Hugging Face model folder?")
        architectures = config.get("architectures") or [_ARCHITECTURES.get(model_type, model_type)]
        arch = find_definition({**config, "architectures": architectures}, f"models.{name}")
        try:
            num_layers = config_value(config, arch.num_layers_key)
        except KeyError:
            num_layers = None
        if not isinstance(num_layers, int):
            raise UserError(f"{where}: {arch.num_layers_key} is missing or not an integer; check the file")
        hidden = next((config[k] for k in _HIDDEN_SIZE_KEYS if isinstance(config.get(k), int)), None)
        if hidden is None:
            raise UserError(f"{where}: hidden_size is missing or not an integer; check the file")
        info = cls(
            name=name,
            model_type=model_type,
            architecture=architectures[0],
            num_layers=num_layers,
            hidden_size=hidden,
            vocab_size=config.get("vocab_size"),
            fixed_depth=isinstance(config.get("layer_types"), list),
        )
        counts = _param_counts(model_type, hidden, config)
        return replace(info, **counts) if counts else info

    @classmethod
    def from_folder(cls, path: str | Path, name: str | None = None) -> "ModelInfo":
        path = Path(path)
        name = name or path.name
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"models.{name}: no config.json in {path}; point it at a Hugging Face model folder")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"models.{name}: {config_file} is not valid JSON (line {e.lineno}); fix or replace it") from None
        return cls.from_config(config, name)


def read_model_infos(paths: dict[str, str | Path]) -> dict[str, ModelInfo]:
    """alias -> ModelInfo for every model of a run (local folders, already resolved)."""
    return {alias: ModelInfo.from_folder(path, alias) for alias, path in paths.items()}


def _param_counts(model_type: str, h: int, c: dict) -> dict | None:
    inter = c.get("intermediate_size")
    vocab = c.get("vocab_size")
    heads = c.get("num_attention_heads")
    if not all(isinstance(v, int) for v in (inter, vocab, heads)):
        return None
    kv_heads = c.get("num_key_value_heads") or heads
    tied = c.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)
    lm_head = 0 if tied else vocab * h

    if model_type in ("llama", "mistral", "qwen2", "gemma"):
        head_dim = c.get("head_dim") or h // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        attn = h * q + 2 * h * kv + q * h
        if model_type == "qwen2":
            attn += q + 2 * kv  # q, k, v carry biases; o_proj does not
        elif model_type in ("llama", "gemma") and c.get("attention_bias", False):
            attn += q + 2 * kv + h
        mlp = 3 * h * inter
        if model_type == "llama" and c.get("mlp_bias", False):
            mlp += 2 * inter + h
        return dict(attn_params=attn, mlp_params=mlp, norm_params=2 * h, outside_params=vocab * h + h + lm_head)

    if model_type == "phi":
        head_dim = h // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        attn = (h * q + q) + 2 * (h * kv + kv) + (q * h + h)  # every projection has a bias
        if c.get("qk_layernorm", False):
            attn += 2 * 2 * head_dim  # LayerNorm weight + bias on q and on k
        mlp = (h * inter + inter) + (inter * h + h)
        # lm_head has a bias, which tying the embeddings does not share.
        return dict(attn_params=attn, mlp_params=mlp, norm_params=2 * h, outside_params=vocab * h + 2 * h + lm_head + vocab)
    return None
