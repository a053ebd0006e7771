"""Tiny stand-in models for tests: real HF folders (config.json, safetensors, tokenizer).

Same architecture and depth as the models a seed recipe names, tiny width, random
init from a fixed seed, so every layer_range applies unchanged and every run
builds identical bytes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from arch_standins import ARCH_CONFIGS, arch_config
from tokenizers import Tokenizer, models, pre_tokenizers, processors

VOCAB = 96
_ALPHABET = [chr(c) for c in range(32, 32 + VOCAB - 4)]  # printable ASCII


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer with BOS added, like the toy zoo's."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({ch: i + 4 for i, ch in enumerate(_ALPHABET)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def standin_config(arch: str, num_layers: int, hidden: int = 64) -> transformers.PretrainedConfig:
    """A config of architecture `arch` ('llama', 'mistral', 'phi', 'gemma', 'qwen2' at `hidden`;
    any other model_type of tests/arch_standins.py at its own tiny width) at `num_layers` layers."""
    if arch in ARCH_CONFIGS:
        return arch_config(arch, num_layers)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=1, head_dim=hidden // 4, **common)
    if arch == "phi":
        return transformers.PhiConfig(num_key_value_heads=4, **common)
    raise ValueError(f"no stand-in for architecture {arch!r}")


def make_standin(
    path: str | Path,
    arch: str,
    num_layers: int,
    seed: int,
    hidden: int = 64,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a randomly initialised model of `arch` to `path` and return the path."""
    path = Path(path)
    config = standin_config(arch, num_layers, hidden)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Random init leaves norms at exactly 1 and biases at 0: perturb every tensor
        # so that a method that takes the wrong source is caught.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.to(dtype).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_finetune(path: str | Path, base: str | Path, seed: int, scale: float = 0.01) -> Path:
    """A 'fine-tune' of `base`: the same weights plus a small seeded delta, as task vectors expect."""
    path = Path(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path
