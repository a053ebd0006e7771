"""Perplexity on a local text or jsonl file (lower is better).

    - kind: perplexity
      path: data/corpus.jsonl      # .jsonl (one document per line, field `field`) or any text file
      field: text                  # the jsonl field holding the text
      heldout_path: data/dev.txt   # optional held-out file for the top-k re-scoring
      tokens: 8192                 # token budget: the first N tokens of the file are scored
      context: 512                 # window length (capped at the model's max positions)
      batch_size: 8
      fidelities: [1024, 8192]     # stages, in tokens: nested prefixes of the same stream

Documents are tokenized as the tokenizer does by default (BOS included when it
adds one), joined with EOS, and cut into non-overlapping windows; every token
after a window's first is predicted once. Tokenization happens once per
tokenizer, not per trial.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from objectives import Objective
from objectives.fidelity import check_fidelities
from objectives.spec import SpecReader
from search.engine.errors import UserError


def read_documents(path: Path, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise UserError(f"{path}:{line_no}: no text field {field!r}; set `field` to the field holding the text")
                docs.append(row[field])
        return docs
    return [path.read_text()]


def token_stream(docs: list[str], tokenizer, budget: int) -> torch.Tensor:
    """The first `budget` tokens of the documents, each tokenized on its own and followed by EOS."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= budget:
            break
    return torch.tensor(ids[:budget], dtype=torch.long)


@torch.no_grad()
def stream_perplexity(model, stream: torch.Tensor, context: int, batch_size: int) -> float:
    """exp(mean negative log-likelihood) over every token but each window's first."""
    device = next(model.parameters()).device
    n_full = len(stream) // context
    windows = list(stream[: n_full * context].view(n_full, context)) if n_full else []
    tail = stream[n_full * context :]
    nll_sum, count = 0.0, 0
    batches = [torch.stack(windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    if len(tail) > 1:
        batches.append(tail[None])
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
    if count == 0:
        raise UserError("perplexity: fewer than 2 tokens to score; raise `tokens` or the smallest fidelity")
    return math.exp(nll_sum / count)


class PerplexityObjective(Objective):
    kind = "perplexity"

    def __init__(
        self,
        path: Path,
        name: str = "perplexity",
        field: str = "text",
        heldout_path: Path | None = None,
        tokens: int = 8192,
        context: int = 512,
        batch_size: int = 8,
        fidelities: list[int] | None = None,
        direction: str = "minimize",
    ):
        self.name, self.direction, self.fidelities = name, direction, fidelities
        self.tokens, self.context, self.batch_size = tokens, context, batch_size
        self.docs = read_documents(path, field)
        self.heldout_docs = read_documents(heldout_path, field) if heldout_path else None
        self.has_heldout = heldout_path is not None
        self._streams: dict[tuple, torch.Tensor] = {}  # (split, tokenizer key) -> token ids

    @classmethod
    def from_spec(cls, spec: dict, where: str, base_dir: Path) -> "PerplexityObjective":
        r = SpecReader(spec, where, base_dir)
        r.raw("kind")
        path = r.path("path")
        if path is None:
            raise r.fail("path", "missing; name a .txt or .jsonl file")
        obj = cls(
            path,
            name=r.str("name", "perplexity"),
            field=r.str("field", "text"),
            heldout_path=r.path("heldout_path"),
            tokens=r.int("tokens", 8192, minimum=2),
            context=r.int("context", 512, minimum=2),
            batch_size=r.int("batch_size", 8),
            fidelities=check_fidelities(r.raw("fidelities"), where),
            direction=r.direction("minimize"),
        )
        r.done()
        if obj.fidelities and obj.fidelities[-1] > obj.tokens:
            raise r.fail("fidelities", f"the last stage ({obj.fidelities[-1]} tokens) exceeds `tokens` ({obj.tokens})")
        return obj

    def _stream(self, split: str, docs: list[str], tokenizer) -> torch.Tensor:
        # Candidates share their tokenizer, though the object may be new per trial.
        key = (split, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer))
        if key not in self._streams:
            self._streams[key] = token_stream(docs, tokenizer, self.tokens)
        return self._streams[key]

    def eval_batch_tokens(self, device_type: str) -> int | None:
        return self.batch_size * self.context

    def _context(self, model) -> int:
        limit = getattr(model.config, "max_position_embeddings", None)
        return min(self.context, limit) if limit else self.context

    def score(self, model, tokenizer, fidelity: int | None = None) -> float:
        stream = self._stream("search", self.docs, tokenizer)
        if fidelity is not None:
            stream = stream[:fidelity]
        return stream_perplexity(model, stream, self._context(model), self.batch_size)

    def score_heldout(self, model, tokenizer) -> float:
        if self.heldout_docs is None:
            return self.score(model, tokenizer, None)
        stream = self._stream("heldout", self.heldout_docs, tokenizer)
        return stream_perplexity(model, stream, self._context(model), self.batch_size)
