"""ties: task vectors trimmed to their largest-magnitude `density` share, then summed
over the elements whose sign agrees with the weighted majority (mergekit 0.1.5).

Which elements a density keeps comes from the ranks of each task vector's magnitudes
(magnitude_ranks.py), computed once per pair and reused by every density after.
"""

from __future__ import annotations

import torch

from search.engine.methods.base import Context, Inputs, Method, pieces
from search.engine.methods.magnitude_ranks import cached_ranks, kept_count
from search.engine.methods.task_arithmetic import (
    KEEP_ALL,
    Selection,
    delta_piece,
    family_params,
    generalized_merge,
    l1_norm,
    piece_length,
)

_MAGNITUDES = 30  # scratch slot of a task vector's piece on its way into the magnitudes


def magnitude(inputs: Inputs, i: int, density: float, rescale: bool, ctx: Context) -> Selection:
    """Keep the k = max(1, int(density * n)) largest |delta| (mergekit's order of equal ones); zero the rest."""
    n = inputs.base.numel()
    k = kept_count(density, n)
    if k is None:
        return KEEP_ALL
    if k == 0:
        return Selection(zero=True)
    key = None if inputs.keys[i] is None else (inputs.keys[i], inputs.keys[inputs.base_index])
    rank = cached_ranks(lambda: magnitudes(inputs, i, ctx), key, ctx)

    def keep(start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        return torch.lt(rank[start:end], k, out=out)

    scale = None
    if rescale:
        before = ctx.cache.get(None if key is None else ("l1", key), lambda: l1_norm(inputs, i, inputs.base.dtype, None, ctx))
        scale = (before, l1_norm(inputs, i, inputs.base.dtype, keep, ctx))
    return Selection(keep=keep, scale=scale)


def magnitudes(inputs: Inputs, i: int, ctx: Context) -> torch.Tensor:
    """|x_i - base|, flattened, as mergekit sorts it: float32 on the CPU, the work dtype elsewhere."""
    base = inputs.base
    dtype = torch.float32 if base.device.type == "cpu" else base.dtype
    w = torch.empty(base.numel(), dtype=dtype, device=base.device)
    for start, end in pieces(base.numel(), piece_length(base)):
        d = delta_piece(inputs, i, start, end, ctx.scratch(_MAGNITUDES, end - start, base.dtype, base.device))
        w[start:end].copy_(d.abs_())
    return w


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=magnitude, consensus=True)


METHOD = Method(
    name="ties",
    params=family_params(default_normalize=True, default_rescale=False),
    merge=merge,
    base="required",
)
