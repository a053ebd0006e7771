"""Tiny Llama models with the zoo's character tokenizer, for the objective tests: saved as real
HF folders and loaded back, as a worker loads them."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from objectives.zoo.tokenizer import VOCAB, make_tokenizer


def tiny_llama(folder: Path, seed: int, **config) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A 2-layer, 32-wide Llama, random from `seed` (config overrides e.g. initializer_range)."""
    settings = dict(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config})).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def constant_llama(folder: Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """A tiny Llama whose logits do not depend on the input: attention and MLP outputs zeroed,
    every embedding the same; its (random) lm_head alone picks the next token."""
    model, tokenizer = tiny_llama(folder, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
    return model, tokenizer
