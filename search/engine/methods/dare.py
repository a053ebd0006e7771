"""dare_ties and dare_linear: task vectors with a random `density` share of elements kept
(Bernoulli), rescaled to the original L1 norm, then summed (dare_linear) or summed with
TIES's sign consensus (dare_ties), as mergekit 0.1.5 runs them.

The draws come from `ctx.generator`, seeded like mergekit's `--random-seed`; the
engine runs tensors in mergekit's order so each one sees the same stream. On the CPU
they are replayed by random_stream.py (the same numbers, faster, kept across candidates);
on an accelerator torch draws them as mergekit does.
"""

from __future__ import annotations

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import Context, Inputs, Method
from search.engine.methods.random_stream import RandomStream, keep_bits, kept_bound, threshold
from search.engine.methods.task_arithmetic import KEEP_ALL, KeptBelow, Selection, generalized_merge, l1_norm


def bernoulli(inputs: Inputs, i: int, density: float, rescale: bool, ctx: Context) -> Selection:
    if density >= 1:
        return KEEP_ALL  # no draw at all: the stream is not advanced
    base = inputs.base
    on_cpu = base.device.type == "cpu"
    # torch has no CPU bernoulli for float16: mergekit draws in float32 there.
    work = base.dtype if (not on_cpu or base.dtype == torch.bfloat16) else torch.float32
    p = torch.full((1,), density, dtype=work)  # the density as torch.full_like stores it
    if not 0 <= float(p) <= 1:
        raise ValueError(f"dare: density {density} is not a probability; use a density between 0 and 1")
    stream = _stream(ctx) if on_cpu else None
    keep = _replayed(stream, base.numel(), float(p), ctx) if stream is not None else _drawn(base, density, work, ctx)
    scale = None
    if rescale:
        key = None if inputs.keys[i] is None else ("l1", inputs.keys[i], inputs.keys[inputs.base_index], work)
        scale = (ctx.cache.get(key, lambda: l1_norm(inputs, i, work, None, ctx)), l1_norm(inputs, i, work, keep, ctx))
    return Selection(keep=keep, work=work, scale=scale)


def _stream(ctx: Context) -> RandomStream | None:
    """The stage's stream, from its seeded generator (None without one: torch's global stream, drawn by torch)."""
    if ctx.draws is None and ctx.generator is not None and ctx.generator.device.type == "cpu":
        ctx.draws = RandomStream(ctx.generator)
    return ctx.draws


def _replayed(stream: RandomStream, n: int, p: float, ctx: Context):
    """keep(start, end, out) for the next n draws of the stream: kept ones from the cache, else drawn (and kept).
    Kept as their top 16 bits where those decide `u < p` (every bfloat16 density), else whole (int32: a
    float32 density, as float16's DARE draws on the CPU)."""
    bound = threshold(p)
    short = kept_bound(bound)
    key = stream.key(n)
    key16, key24 = (None, None) if key is None else (key + ("top16",), key + ("all24",))
    if short is not None and (kept := ctx.cache.peek(key16)) is not None:
        stream.skip(n)
        return _below(kept, short)
    if (whole := ctx.cache.peek(key24)) is not None:
        stream.skip(n)
        return KeptBelow(whole, bound)
    u = stream.uniform_bits(n, torch.empty(n, dtype=torch.int32), ctx)
    if short is not None and key16 is not None and ctx.cache.room_for(2 * n):
        return _below(ctx.cache.put(key16, keep_bits(u)), short)
    if short is None and key24 is not None and ctx.cache.room_for(4 * n):
        ctx.cache.put(key24, u)
    return KeptBelow(u, bound)


def _below(kept: torch.Tensor, short: int) -> KeptBelow:
    """The kept-mask of kept draws (top 16 bits) under their bound."""
    return KeptBelow(None, 0) if short > 32767 else KeptBelow(kept, short)  # p rounds to 1: every draw is under it


def _drawn(base: torch.Tensor, density: float, work: torch.dtype, ctx: Context):
    """keep(start, end, out) from torch's own bernoulli over the whole tensor (accelerators; torch's global stream)."""
    flat = torch.bernoulli(torch.full_like(base, density, dtype=work), generator=ctx.generator).reshape(-1)
    return lambda start, end, out: torch.ne(flat[start:end], 0, out=out)


def merge_linear(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=bernoulli)


def merge_ties(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=bernoulli, consensus=True)


DARE_TIES = Method(
    name="dare_ties",
    params=PARAMS["dare_ties"],
    merge=merge_ties,
    base="required",
    randomized=True,
)
DARE_LINEAR = Method(
    name="dare_linear",
    params=PARAMS["dare_linear"],
    merge=merge_linear,
    base="required",
    randomized=True,
)
