"""Tiny configs, one per causal-LM architecture that mergekit 0.1.5 defines and transformers 5 builds.

Each is the architecture's own config class at tiny size (hidden 32, 2-4 layers, the stand-ins'
96-token vocabulary with BOS/EOS/PAD 1/2/3). Where a definition names tensors that a config
switch turns on (qk norms, biases, a second layer kind), the switch is on, so every kind of tensor
the definition lists is merged; tied and untied heads both occur. The keys are config.json's
`model_type`.
"""

from __future__ import annotations

import transformers

_IDS = dict(vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=3)
_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, **_IDS,
)  # fmt: skip

# model_type -> keyword arguments of its config class
ARCH_CONFIGS: dict[str, dict] = {
    "apertus": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "arcee": dict(_LLAMA_LIKE, tie_word_embeddings=True),
    # mergekit's definition lists q_norm/k_norm: Command-R+'s form (use_qk_norm) is the one it merges.
    "cohere": dict(_LLAMA_LIKE, use_qk_norm=True, tie_word_embeddings=True),
    "cohere2": dict(_LLAMA_LIKE, head_dim=8, sliding_window=16, tie_word_embeddings=True),
    # mergekit's definition is Falcon-40B/180B's layout (new_decoder_architecture: ln_attn, ln_mlp).
    "falcon": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
        max_position_embeddings=128, tie_word_embeddings=False, **_IDS,
    ),
    "gemma2": dict(_LLAMA_LIKE, head_dim=8, sliding_window=16, tie_word_embeddings=True),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=8, sliding_window=16, tie_word_embeddings=False),
    "glm4": dict(_LLAMA_LIKE, head_dim=8, attention_bias=True, tie_word_embeddings=False),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=True, **_IDS),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=False, **_IDS),
    "granite": dict(_LLAMA_LIKE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    # one Mamba layer and one attention layer: each leaves the other's optional tensors out
    "granitemoehybrid": dict(
        _LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=32,
        mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
        layer_types=["mamba", "attention"], tie_word_embeddings=True,
    ),  # fmt: skip
    "lfm2": dict(
        _LLAMA_LIKE, block_ff_dim=64, block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention"],
        tie_word_embeddings=True,
    ),
    "mamba": dict(hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4, tie_word_embeddings=False, **_IDS),
    "mixtral": dict(_LLAMA_LIKE, num_local_experts=2, num_experts_per_tok=1, tie_word_embeddings=False),
    "olmo2": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "phi3": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "qwen3": dict(_LLAMA_LIKE, head_dim=8, tie_word_embeddings=True),
    "qwen3_moe": dict(_LLAMA_LIKE, head_dim=8, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, tie_word_embeddings=False),
    "stablelm": dict(_LLAMA_LIKE, use_qkv_bias=True, tie_word_embeddings=False),
    "starcoder2": dict(_LLAMA_LIKE, tie_word_embeddings=True),
}


def arch_config(model_type: str, num_layers: int | None = None) -> transformers.PretrainedConfig:
    """The tiny config of `model_type`, at `num_layers` layers when given."""
    kwargs = dict(ARCH_CONFIGS[model_type])
    if num_layers is not None:
        kwargs["n_layer" if "n_layer" in kwargs else "num_hidden_layers"] = num_layers
        if "layer_types" in kwargs:  # hybrids: the two kinds alternate
            kinds = kwargs["layer_types"]
            kwargs["layer_types"] = [kinds[i % len(kinds)] for i in range(num_layers)]
    return transformers.CONFIG_MAPPING[model_type](**kwargs)
