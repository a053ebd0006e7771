"""Re-index vocabulary tensors (embeddings, the head) onto a merge's output vocabulary, as mergekit 0.1.5's
PermutedVocabulary does, before the merge method sees them.

For one output tensor and the models that have it (in the recipe's order), every output token gets, in each
model, the row of that token in the model itself. A token a model lacks (or one the recipe forces) gets a
default row instead, the same for every model that needs it:
- the recipe's `tokens:` entry when it has one: a model's row of the token, a model's row of another token,
  or zeros;
- else the one model that has it, if only one does;
- else the base model's row, if the base is among the models and has it;
- else the mean of the rows of the models that have it (summed in model order from zeros, then divided);
- zeros when no model has it.
Rows past the tokens (pad_to_multiple_of) are the mean of the token rows, per model.

Planning (`plan_rows`) depends only on the vocabularies, so a worker does it once per source set;
`apply_rows` runs the plan on tensors in the dtype the merge computes in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from search.engine.errors import UserError
from search.engine.tokenizer_config import ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

# A default row: ("copy", input index, row), ("zero",), or ("mean", ((input index, row), ...)).
Default = tuple


@dataclass(frozen=True)
class RowPlan:
    tokens: int  # output tokens (ids 0 .. tokens-1)
    size: int  # output rows (tokens, padded)
    own: tuple[torch.Tensor, ...]  # per input: for each output id, its own row kept, or -1
    defaults: tuple[tuple[int, Default], ...]  # (output id, default row) for the ids some input needs
    uses: tuple[torch.Tensor, ...]  # per input: indices into `defaults` it takes (ids where own is -1)

    @cached_property
    def identity(self) -> bool:
        """Every input keeps its rows where they are: re-indexing would copy them unchanged."""
        if self.size != self.tokens or any(len(u) for u in self.uses):
            return False
        ids = torch.arange(self.tokens)
        return all(torch.equal(own, ids) for own in self.own)


def plan_rows(
    tokens: dict[str, int],
    size: int,
    rows: list[list[int]],
    inputs: list[str],
    base: str | None,
    settings: dict[str, TokenEmbedding],
    own_vocabularies: dict[str, dict[str, int]],
    input_rows: list[int],
    where: str,
) -> RowPlan:
    """The plan for one output tensor.

    tokens: the output vocabulary (token -> id); size: output rows; rows[k]: for each output id, the row of
    that token in inputs[k] (-1 when it lacks it); settings: the recipe's `tokens:` entries;
    own_vocabularies: each model's own vocabulary (for a `token:` source); input_rows[k]: rows of inputs[k]'s
    tensor. Raises UserError where mergekit would fail."""
    n = len(tokens)
    by_id = [None] * n
    for token, i in tokens.items():
        by_id[i] = token
    present = torch.tensor(rows, dtype=torch.long).reshape(len(inputs), n) >= 0
    base_k = inputs.index(base) if base in inputs else None

    forced = torch.zeros(n, dtype=torch.bool)
    for token, cfg in settings.items():
        if cfg.force and token in tokens:
            forced[tokens[token]] = True
    defaults: list[tuple[int, Default]] = []
    # only tokens some input lacks, or forced ones, get a default row (vocabularies share most tokens)
    for i in (~present.all(0) | forced).nonzero().flatten().tolist():
        token = by_id[i]
        cfg = settings.get(token)
        if cfg is not None:
            defaults.append((i, _configured(cfg, token, i, rows, inputs, own_vocabularies, input_rows, where)))
            continue
        holders = [k for k in range(len(inputs)) if rows[k][i] >= 0]
        if len(holders) == 1:
            defaults.append((i, ("copy", holders[0], rows[holders[0]][i])))
        elif not holders:
            defaults.append((i, ("zero",)))
        elif base_k is not None and rows[base_k][i] >= 0:
            defaults.append((i, ("copy", base_k, rows[base_k][i])))
        else:
            defaults.append((i, ("mean", tuple((k, rows[k][i]) for k in holders))))

    default_of = torch.full((n,), -1, dtype=torch.long)
    if defaults:
        default_of[torch.tensor([i for i, _ in defaults])] = torch.arange(len(defaults))
    own, uses = [], []
    for k in range(len(inputs)):
        r = torch.tensor(rows[k], dtype=torch.long)
        if len(r) and int(r.max()) >= input_rows[k]:
            token = by_id[int(r.argmax())]
            raise UserError(f"{where}: {inputs[k]} numbers token {token!r} {int(r.max())} but its tensor has "
                            f"{input_rows[k]} rows; fix that model's config vocab_size or tokenizer")
        keep = (r >= 0) & ~forced
        own.append(torch.where(keep, r, -1))
        uses.append(default_of[~keep])
    return RowPlan(n, size, tuple(own), tuple(defaults), tuple(uses))


def _configured(cfg: TokenEmbedding, token: str, i: int, rows, inputs, own_vocabularies, input_rows, where) -> Default:
    """The default row a `tokens:` entry gives, checked as mergekit would (it fails at merge time)."""
    at = f"{where}.tokens.{token}"
    source = cfg.source
    if isinstance(source, ZeroEmbedding):
        return ("zero",)
    if source is None:
        raise UserError(f"{at}: some models lack this token, so it needs a `source:` (a model, or {{kind: zero}})")
    model = source.model if isinstance(source, ModelTokenEmbedding) else source
    if model not in inputs:
        raise UserError(f"{at}.source: {model} is not among the merged models; name one of {', '.join(inputs)}")
    k = inputs.index(model)
    if isinstance(source, ModelTokenEmbedding):
        row = source.token_id
        if row is None:
            row = own_vocabularies.get(model, {}).get(source.token)
            if row is None:
                raise UserError(f"{at}.source.token: {model}'s tokenizer has no token {source.token!r}; name one it has")
        if row >= input_rows[k]:
            raise UserError(f"{at}.source: token id {row} is beyond {model}'s {input_rows[k]} embedding rows")
        return ("copy", k, row)
    if rows[k][i] < 0:
        raise UserError(f"{at}.source: {model} has no token {token!r}; take it from a model that has it")
    return ("copy", k, rows[k][i])


def apply_rows(plan: RowPlan, tensors: list[torch.Tensor], axis: int) -> list[torch.Tensor]:
    """Each input re-indexed onto the output vocabulary (new tensors, in the inputs' dtype)."""
    views = [t.movedim(axis, 0) for t in tensors]
    shape, dtype, device = views[0].shape[1:], views[0].dtype, views[0].device
    defaults = [_default_row(d, views, shape, dtype, device) for _, d in plan.defaults]
    default_ids = torch.tensor([i for i, _ in plan.defaults], dtype=torch.long)
    out = []
    for view, own, uses in zip(views, plan.own, plan.uses):
        new = torch.zeros((plan.size, *shape), dtype=dtype, device=device)
        kept = (own >= 0).nonzero().squeeze(1)
        new[kept.to(device)] = view[own[kept].to(device)]
        if len(uses):
            new[default_ids[uses].to(device)] = torch.stack([defaults[u] for u in uses.tolist()])
        if plan.size > plan.tokens:  # padding rows: the mean token row (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
            new[plan.tokens :] = torch.mean(new[: plan.tokens], dim=0)
        out.append(new.movedim(0, axis))
    return out


def _default_row(default: Default, views, shape, dtype, device) -> torch.Tensor:
    if default[0] == "copy":
        _, k, row = default
        return views[k][row].to(dtype)
    if default[0] == "zero":
        return torch.zeros(shape, dtype=dtype, device=device)
    # mergekit's mean, op for op: from zeros, one model at a time, then an in-place division
    embed = torch.zeros(shape, dtype=dtype, device=device)
    for k, row in default[1]:
        embed = embed + views[k][row]
    embed /= len(default[1])
    return embed
