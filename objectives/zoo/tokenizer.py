"""The zoo's character-level tokenizer.

One token per character plus four specials. BOS is added by the tokenizer's
post-processor, so training, `generate`, lm-eval and mergekit all see the same
input ids for the same text without anyone passing flags.
"""

from __future__ import annotations

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK, BOS, EOS, PAD = range(4)
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789:> \n"
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}


def encode(text: str) -> list[int]:
    """Token ids of `text` with BOS first, as the HF tokenizer returns them (fast path for training)."""
    return [BOS] + [VOCAB[c] for c in text]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.Fuse()  # characters join without spaces: decode("bcd") == "bcd"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
