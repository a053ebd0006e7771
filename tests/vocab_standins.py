"""Stand-ins whose vocabularies differ from their base's: real HF folders (config.json,
safetensors, tokenizer.json) written from a base stand-in's files.

A variant is a small seeded fine-tune of the base whose tokenizer
- adds tokens (chat markers, as instruction fine-tunes do), with embedding rows for them;
- orders the same characters differently, its embedding rows moved along (the same model
  under another numbering);
- has regular (non-added) vocabulary entries the base lacks;
- or leaves spare embedding rows beyond its tokens (vocab_size padded, as many models ship).
Everything is deterministic: the same seed writes the same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from standins import _ALPHABET
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias")  # indexed by token


def char_tokenizer(chars: list[str], bpe: bool = False) -> transformers.PreTrainedTokenizerFast:
    """The stand-ins' character-level tokenizer (BOS added) over `chars`, in that order after the specials;
    bpe: the same vocabulary as a BPE model without merges (the kind mergekit strips)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>") if bpe else models.WordLevel(vocab=vocab, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_vocab_variant(
    path: str | Path,
    base: str | Path,
    seed: int,
    *,
    added: list[str] = (),
    extra_chars: list[str] = (),
    shuffle: bool = False,
    spare_rows: int = 0,
    unused: list[str] = (),
    bpe: bool = False,
    scale: float = 0.01,
) -> Path:
    """A seeded fine-tune of `base` with another vocabulary (see the module docstring); rows of
    tokens the base lacks are drawn from the seed. unused: tokens added to the tokenizer after all
    others without an embedding row (beyond vocab_size)."""
    path, base = Path(path), Path(base)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(base / "model.safetensors")
    tensors = {k: v + (torch.randn(v.shape, generator=gen) * scale).to(v.dtype) for k, v in tensors.items()}

    chars = list(_ALPHABET)
    order = list(range(len(SPECIALS) + len(chars)))  # new id -> base row
    if shuffle:
        perm = torch.randperm(len(chars), generator=gen).tolist()
        chars = [chars[i] for i in perm]
        order = list(range(len(SPECIALS))) + [len(SPECIALS) + i for i in perm]
    tokenizer = char_tokenizer(chars + list(extra_chars), bpe)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    new_rows = len(extra_chars) + len(added) + spare_rows
    for name in VOCAB_TENSORS:
        if name in tensors:
            t = tensors[name][order]
            extra = (torch.randn((new_rows, *t.shape[1:]), generator=gen) * 0.02).to(t.dtype)
            tensors[name] = torch.cat([t, extra]).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = len(order) + new_rows
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if unused:
        tokenizer.add_tokens(list(unused))
    tokenizer.save_pretrained(path)
    return path


def make_tied(path: str | Path, untied: str | Path) -> Path:
    """`untied` with its head tied to the embeddings: no lm_head.weight, tie_word_embeddings true."""
    path, untied = Path(path), Path(untied)
    if path.exists():
        shutil.rmtree(path)
    shutil.copytree(untied, path)
    tensors = load_file(untied / "model.safetensors")
    tensors.pop("lm_head.weight")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
