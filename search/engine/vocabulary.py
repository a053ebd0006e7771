"""A stage's output vocabulary, as mergekit 0.1.5 builds it for `tokenizer_source` / `tokenizer:`.

The output tokenizer is
- base: the base model's tokenizer (the first model's when there is no base), without tokens numbered at or
  beyond its config's vocab_size (BPE tokenizers only, as in mergekit);
- a model's name: that model's tokenizer as it is;
- union: the base's, plus every other model's tokens it lacks, in the order of the models in the recipe:
  first their regular vocabulary entries (by id), then their added tokens (by id), each with the settings of
  the first model that adds it;
then every token the recipe's `tokens:` names that it lacks is added, in the recipe's order. Each model's
tokens are then found by text in the output vocabulary (vocabulary_rows.py moves the embedding rows).

Where mergekit's own order is left to chance (it collects the models in a set, and reads each vocabulary in
hash order), the recipe's order is used: the same output whenever mergekit's is determined, one fixed
output where it is not (union of several models that each bring new regular tokens, no base model).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from search.engine.errors import UserError
from search.engine.tokenizer_config import TokenizerSetting

if TYPE_CHECKING:
    import transformers


@dataclass
class ModelVocabulary:
    """What one merged model brings: its tokenizer (None: it has none, mergekit then assumes the base's)
    and its config's vocab_size (the rows that hold tokens)."""

    name: str
    tokenizer: "transformers.PreTrainedTokenizerBase | None"
    vocab_size: int | None


@dataclass
class Vocabulary:
    """The output tokenizer and, for each merged model, where each output token sits in its embeddings."""

    setting: TokenizerSetting
    tokenizer: "transformers.PreTrainedTokenizerBase"  # saved with the merge; candidates are scored with it
    tokens: dict[str, int]
    size: int  # rows of the output embeddings (config vocab_size): the tokens, padded
    rows: dict[str, list[int]]  # model -> for each output id, its row of that token (-1: lacks it)
    own: dict[str, dict[str, int]]  # model -> its own vocabulary (a `tokens:` source may name a token)


def build_vocabulary(
    setting: TokenizerSetting,
    base: ModelVocabulary,
    others: list[ModelVocabulary],
    load_source: Callable[[str], "transformers.PreTrainedTokenizerBase"],
    where: str,
) -> Vocabulary:
    """base: the base model (the first model without one); others: the other merged models, in recipe order;
    load_source: a fresh tokenizer of a model named as tokenizer source."""
    base = ModelVocabulary(base.name, strip_unused_tokens(base, where), base.vocab_size)
    if base.tokenizer is None:
        raise UserError(f"{where}.{setting.field}: {base.name} has no tokenizer files; give the base model a tokenizer")
    if setting.source == "base":
        out = base.tokenizer
    elif setting.source == "union":
        out = union_tokenizer(base, others)
    else:
        out = load_source(setting.source)
        if out is None:
            raise UserError(f"{where}.{setting.field}: {setting.source} has no tokenizer files; name a model that has one")
    existing = set(out.get_vocab())
    for token, _ in setting.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    tokens = out.get_vocab()
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise UserError(f"{where}.{setting.field}: the output tokenizer numbers its tokens with gaps; mergekit cannot "
                        "build embeddings for it - choose another tokenizer source")
    rows, own = {}, {}
    for model in [base, *others]:
        vocab = (model.tokenizer or base.tokenizer).get_vocab()
        own[model.name] = vocab
        rows[model.name] = token_rows(tokens, vocab, model.vocab_size or len(vocab), model.name, where, setting)
    return Vocabulary(setting, out, tokens, setting.padded(len(tokens)), rows, own)


def token_rows(tokens: dict[str, int], vocab: dict[str, int], vocab_size: int, model: str, where: str,
               setting: TokenizerSetting) -> list[int]:
    """For each output id, the model's row of that token, -1 where the model lacks it."""
    rows = [-1] * len(tokens)
    for token, i in tokens.items():
        row = vocab.get(token, -1)
        if row >= vocab_size:
            # mergekit skips the token for this model and then fails on it while merging
            raise UserError(
                f"{where}.{setting.field}: {model}'s tokenizer numbers {token!r} {row}, beyond its vocab_size "
                f"{vocab_size}, and the output vocabulary has it; fix that model's config or tokenizer"
            )
        rows[i] = row
    return rows


def strip_unused_tokens(model: ModelVocabulary, where: str):
    """The model's tokenizer without the tokens numbered at or beyond its vocab_size (they have no
    embedding row), as mergekit prepares the base's; the tokenizer itself when there are none."""
    tokenizer = model.tokenizer
    if tokenizer is None or model.vocab_size is None:
        return tokenizer
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= model.vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else None
    if data is None or data["model"]["type"] != "BPE":
        kind = data["model"]["type"] if data else "a slow tokenizer"
        raise UserError(
            f"{where}: {model.name}'s tokenizer has tokens beyond its vocab_size {model.vocab_size} and is {kind}; "
            "mergekit strips such tokens from BPE tokenizers only - use a base model whose tokens fit its embeddings"
        )
    import tokenizers

    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < model.vocab_size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}
    data["model"]["merges"] = [m for m in data["model"]["merges"] if not set(_merge_parts(m)) & unused]
    try:
        tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # a merge that makes a stripped token: mergekit fails there too
        raise UserError(
            f"{where}: {model.name}'s tokenizer has tokens beyond its vocab_size {model.vocab_size} that cannot be "
            f"stripped ({str(e).splitlines()[0]}); use a base model whose tokens fit its embeddings"
        ) from None
    return tokenizer


def _merge_parts(merge) -> list[str]:
    if isinstance(merge, str) and merge.count(" ") == 1:
        return merge.split(" ")
    if isinstance(merge, list):
        return merge
    raise UserError(f"tokenizer: a BPE merge {merge!r} is neither 'a b' nor [a, b]; re-save the tokenizer")


def union_tokenizer(base: ModelVocabulary, others: list[ModelVocabulary]):
    """The base's tokenizer plus every token of the others it lacks (see the module docstring)."""
    import transformers

    regular: dict[str, None] = {}
    added = {}
    for model in [base, *others]:
        if model.tokenizer is None:
            continue
        size = model.vocab_size or model.tokenizer.vocab_size
        for token, i in sorted(model.tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if i < size:
                regular.setdefault(token)
        for i, info in model.tokenizer.added_tokens_decoder.items():
            if i < size:
                added.setdefault(info.content, info)
    # a fresh copy of the base's, as mergekit makes it (saved and read back)
    with tempfile.TemporaryDirectory() as folder:
        base.tokenizer.save_pretrained(folder, legacy_format=False)
        out = transformers.AutoTokenizer.from_pretrained(folder, use_fast=True)
    base_vocab = base.tokenizer.get_vocab()
    for token in regular:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out
