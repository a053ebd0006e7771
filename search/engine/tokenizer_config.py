"""A recipe's tokenizer settings, typed: mergekit 0.1.5's `tokenizer_source` and `tokenizer:` block.

    tokenizer_source: union            # or base, or a model's name
    tokenizer:                         # instead of tokenizer_source, with more control
      source: union                    # union (the default), base, or a model's name
      tokens:                          # where the embedding of a token comes from
        <|im_start|>:
          source: org/chat             # that model's row of this token
          force: true                  # for every model, even those that have the token
        <|im_end|>:
          source: {kind: zero}         # a row of zeros
        <tool>:
          source: {kind: model_token, model: org/chat, token: "<|im_end|>"}  # or token_id: 7
      pad_to_multiple_of: 64           # rows (and config vocab_size) rounded up; extra rows = mean row

Fields left out stay out when a recipe is written back (so a recipe round-trips unchanged);
`TokenizerSetting` reads them with mergekit's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZeroEmbedding(_Strict):
    kind: Literal["zero"]


class ModelTokenEmbedding(_Strict):
    """The row of one token (by id or by text) in one model's own embeddings."""

    kind: Literal["model_token"]
    model: str
    token_id: Optional[int] = Field(default=None, ge=0)
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


TokenSource = Union[ZeroEmbedding, ModelTokenEmbedding, str]


class TokenEmbedding(_Strict):
    source: Optional[TokenSource] = None
    force: Optional[bool] = None


class TokenizerBlock(_Strict):
    """The `tokenizer:` block of a recipe."""

    source: Optional[str] = None
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, ge=1)


@dataclass(frozen=True)
class TokenizerSetting:
    """What a stage asks of its vocabulary, with mergekit's defaults filled in."""

    source: str  # "base", "union" or a model's name
    tokens: tuple[tuple[str, TokenEmbedding], ...] = ()  # in the recipe's order (it numbers added tokens)
    pad_to_multiple_of: int | None = None
    field: str = "tokenizer_source"  # the recipe field it came from, for error messages

    def padded(self, size: int) -> int:
        """Rows for `size` tokens: rounded up to pad_to_multiple_of."""
        pad = self.pad_to_multiple_of
        return size if not pad or size % pad == 0 else size + pad - size % pad


def tokenizer_setting(tokenizer_source: str | None, block: TokenizerBlock | None) -> TokenizerSetting | None:
    """The stage's setting, or None when it keeps the base model's vocabulary untouched."""
    if block is not None:
        tokens = tuple((block.tokens or {}).items())
        return TokenizerSetting(block.source or "union", tokens, block.pad_to_multiple_of, "tokenizer")
    if tokenizer_source is not None:
        return TokenizerSetting(tokenizer_source)
    return None


def stage_setting(stage) -> TokenizerSetting | None:
    """A recipe stage's setting (a mergekit-moe stage has none)."""
    return tokenizer_setting(getattr(stage, "tokenizer_source", None), getattr(stage, "tokenizer", None))
