"""The TinyLlama-1.1B-shaped random pair that issue 2's engine benchmarks merge:
hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab 32000, bf16."""

from __future__ import annotations

import torch

TINYLLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    rope_theta=10000.0,
    torch_dtype="bfloat16",
)


def tinyllama_tensors(seed: int) -> dict[str, torch.Tensor]:
    c = TINYLLAMA
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "input_layernorm.weight"] = 1 + rand(h)
        t[p + "self_attn.q_proj.weight"] = rand(h, h)
        t[p + "self_attn.k_proj.weight"] = rand(kv, h)
        t[p + "self_attn.v_proj.weight"] = rand(kv, h)
        t[p + "self_attn.o_proj.weight"] = rand(h, h)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(h)
        t[p + "mlp.gate_proj.weight"] = rand(i, h)
        t[p + "mlp.up_proj.weight"] = rand(i, h)
        t[p + "mlp.down_proj.weight"] = rand(h, i)
    t["model.norm.weight"] = 1 + rand(h)
    t["lm_head.weight"] = rand(v, h)
    return t
