"""Batches sized by a token budget instead of a count of examples.

A batch of right-padded sequences costs its count times its longest length, in
compute and in logits memory (tokens x vocabulary). A fixed count either wastes a
GPU on short prompts or runs out of memory on long ones; a budget of padded tokens
does neither. Examples are taken longest first, so each batch is as wide as its
first example and neighbours have similar lengths (little padding).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")

# Padded tokens per batch when the spec names neither batch_tokens nor batch_size. On a GPU the
# logits of one batch (tokens x vocabulary, e.g. 32768 x 32000 in bf16 = 2 GiB, and lm-eval's
# log-softmax as much again) must fit beside the model. On a CPU a matrix product is efficient
# well before 1024 rows, and larger batches lose the caches (bench/bench_eval.py: 4096 tokens
# cost the toy zoo's model 1.46x a bare forward pass in CPU time where 64 examples cost 1.22x).
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "accelerator": 32768}


def default_batch_tokens(device_type: str) -> int:
    return DEFAULT_BATCH_TOKENS["cpu" if device_type == "cpu" else "accelerator"]


def token_batches(lengths: Sequence[int], budget: int, max_examples: int | None = None) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches longest first: a batch's padded size (its
    count times its longest length) is at most `budget`, and it holds at most `max_examples`.
    An example longer than the budget is a batch of its own. Equal lengths keep their order,
    so a caller that orders its examples (e.g. to keep shared contexts together) keeps it."""
    if budget < 1:
        raise ValueError(f"budget must be at least 1 token, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first is the longest
        full = (len(current) + 1) * max(width, 1) > budget or (max_examples is not None and len(current) >= max_examples)
        if current and full:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def in_original_order(batches: list[list[int]], results: list[list[T]]) -> list[T]:
    """Per-batch results put back at their examples' original positions."""
    out: list = [None] * sum(len(b) for b in batches)
    for batch, batch_results in zip(batches, results, strict=True):
        for i, r in zip(batch, batch_results, strict=True):
            out[i] = r
    return out
