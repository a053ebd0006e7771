"""ties: task vectors trimmed to their largest-magnitude `density` share, then summed
over the elements whose sign agrees with the weighted majority (mergekit 0.1.5).

Which elements a density keeps comes from the ranks of each task vector's magnitudes
(magnitude_ranks.py), computed once per pair and reused by every density after.
"""

from __future__ import annotations

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import Context, Inputs, Method
from search.engine.methods.lanes import map_in_lanes, run_pieces
from search.engine.methods.magnitude_ranks import cached_ranks, kept_count, ranks
from search.engine.methods.task_arithmetic import (
    KEEP_ALL,
    KeptBelow,
    Selection,
    delta_piece,
    generalized_merge,
    l1_norm,
    piece_length,
)


def magnitude(inputs: Inputs, i: int, density: float, rescale: bool, ctx: Context, rank: torch.Tensor | None = None) -> Selection:
    """Keep the k = max(1, int(density * n)) largest |delta| (mergekit's order of equal ones); zero the rest.
    rank: the task vector's ranks, when the caller has them."""
    n = inputs.base.numel()
    k = kept_count(density, n)
    if k is None:
        return KEEP_ALL
    if k == 0:
        return Selection(zero=True)
    key = _key(inputs, i)
    if rank is None:
        rank = cached_ranks(lambda: magnitudes(inputs, i), key, ctx)

    keep = KeptBelow(rank, k)
    scale = None
    if rescale:
        before = ctx.cache.get(None if key is None else ("l1", key), lambda: l1_norm(inputs, i, inputs.base.dtype, None, ctx))
        scale = (before, l1_norm(inputs, i, inputs.base.dtype, keep, ctx))
    return Selection(keep=keep, scale=scale)


def _key(inputs: Inputs, i: int):
    return None if inputs.keys[i] is None else (inputs.keys[i], inputs.keys[inputs.base_index])


def magnitudes(inputs: Inputs, i: int) -> torch.Tensor:
    """|x_i - base|, flattened, as mergekit sorts it: float32 on the CPU, the work dtype elsewhere."""
    base = inputs.base
    dtype = torch.float32 if base.device.type == "cpu" else base.dtype
    w = torch.empty(base.numel(), dtype=dtype, device=base.device)
    step = piece_length(base)
    buffers: dict[int, torch.Tensor] = {}  # one piece per lane (this may run inside another lane's work)

    def fill(start: int, end: int, lane: int) -> None:
        buf = buffers.setdefault(lane, torch.empty(step, dtype=base.dtype, device=base.device))
        w[start:end].copy_(delta_piece(inputs, i, start, end, buf[: end - start]).abs_())

    run_pieces(base.numel(), step, fill, base.device)
    return w


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    # The sorts of a tensor's task vectors are independent (and single-threaded in torch): on the
    # CPU they run side by side, one per lane, before the pass that uses them (as many as ctx.sort_bound allows).
    n = inputs.base.numel()
    wanted = [i for i in range(len(inputs.tensors)) if i != inputs.base_index and kept_count(per_input[i]["density"], n)]
    found = {i: ctx.cache.peek(("magnitude-ranks", _key(inputs, i))) if _key(inputs, i) is not None else None for i in wanted}
    missing = [i for i in wanted if found[i] is None]
    at_once = len(missing) if ctx.sort_bound is None else max(1, ctx.sort_bound // max(1, n))
    for i, rank in zip(missing, map_in_lanes(lambda i: ranks(magnitudes(inputs, i)), missing, inputs.base.device, at_once)):
        found[i] = rank
        if _key(inputs, i) is not None:
            ctx.cache.put(("magnitude-ranks", _key(inputs, i)), rank)

    def sparsify(inputs: Inputs, i: int, density: float, rescale: bool, ctx: Context) -> Selection:
        return magnitude(inputs, i, density, rescale, ctx, found.get(i))

    return generalized_merge(inputs, shared, per_input, ctx, sparsify=sparsify, consensus=True)


METHOD = Method(
    name="ties",
    params=PARAMS["ties"],
    merge=merge,
    base="required",
)
