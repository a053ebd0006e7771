"""task_arithmetic, and the family it heads (ties, dare_ties, dare_linear), as mergekit 0.1.5 runs them.

With task vectors d_i = x_i - base (in the work dtype), optionally sparsified:
  out = base + lambda * sum_i w_i d_i [/ divisor when normalize]
where the divisor is sum_i w_i (or, with a sign consensus, the sum of the weights
that agree with the majority sign at each element). Weights are rounded to the
work dtype first, as mergekit does.

How it runs: mergekit's own sequence of torch ops, op for op and dtype for dtype, but over
pieces of the flattened tensors into reused scratch buffers. Every op of that sequence is
elementwise or a sum over the models at one element, so a piece computes exactly the bytes the
whole tensor would; the pass reads the inputs and writes the output once, where mergekit's ops
make a dozen tensor-sized temporaries (its peak memory, and first-touch page faults). What needs
the whole tensor is settled first, per input (`Selection`): which elements a density keeps
(TIES's ranks, DARE's draws: ties.py, dare.py) and DARE's L1 rescale factor (sums over the
whole tensor, in torch's own order). Task vectors are not kept: recomputing a piece is cheaper
than the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import CHUNK, DEVICE_PIECE, Context, Inputs, Method
from search.engine.methods.lanes import run_pieces

EPS = 1e-7  # mergekit's rescale guard
# CPU pieces: a quarter of CHUNK, so that the ~8 bytes an element the pass keeps per model stay in L2.
FAMILY_PIECE = CHUNK // 4
# Scratch slots (Context.scratch) of this family's passes.
(_DELTAS, _SIGN, _SIGN_MASK, _AGREE, _AGREE_AS_DTYPE, _PRODUCT, _SUMMED, _MAJORITY_BOOL, _MAJORITY, _MIXED, _WORK, _KEEP,
 _FULL) = range(10, 23)


@dataclass
class Selection:
    """How one task vector is sparsified for this candidate (mergekit's `sparsify`)."""

    keep: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None  # writes the kept-mask of elements [s, e) into a bool piece
    zero: bool = False  # torch.zeros_like (density <= 0 under TIES): +0 everywhere, not delta * 0
    work: torch.dtype | None = None  # the dtype masking and rescaling run in (DARE: float32 for float16 on the CPU)
    scale: tuple[torch.Tensor, torch.Tensor] | None = None  # DARE's L1 norms (before, after masking), 0-dim


KEEP_ALL = Selection()

# sparsify(inputs, input index, density, rescale, ctx) -> Selection
Sparsifier = Callable[[Inputs, int, float, bool, Context], Selection]


def piece_length(t: torch.Tensor) -> int:
    return FAMILY_PIECE if t.device.type == "cpu" else DEVICE_PIECE


def delta_piece(inputs: Inputs, i: int, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
    """out = (x_i - base)[start:end], the task vector's piece, in the work dtype."""
    return torch.sub(inputs.tensors[i].reshape(-1)[start:end], inputs.base.reshape(-1)[start:end], out=out)


def l1_norms_apply(masked: torch.Tensor, scale: tuple[torch.Tensor, torch.Tensor], on_device: bool) -> torch.Tensor:
    """masked * (before / after), unless either norm is under EPS (mergekit's rescaled_masked_tensor), in place.
    mergekit branches on the norms in Python, which on a GPU waits for both sums; the same choice
    made on the device (on_device) gives the same values without waiting."""
    before, after = scale
    if not on_device:
        if not (before < EPS or after < EPS):
            masked.mul_(before / after)
        return masked
    return torch.where((before < EPS) | (after < EPS), masked, masked * (before / after), out=masked)


def l1_norm(inputs: Inputs, i: int, work: torch.dtype, keep, ctx: Context) -> torch.Tensor:
    """|x_i - base| (masked by keep, if given) summed over the whole tensor, in `work`: torch's own sum
    of a tensor of the input's shape on this thread, so the same additions (and last bits) as mergekit's."""
    base = inputs.base
    n = base.numel()
    full = ctx.scratch(_FULL, n, work, base.device)

    def fill(start: int, end: int, lane: int) -> None:
        d = delta_piece(inputs, i, start, end, ctx.scratch((_DELTAS, lane), end - start, base.dtype, base.device))
        piece = full[start:end]
        piece.copy_(d)
        if keep is not None:
            piece.mul_(keep(start, end, ctx.scratch((_KEEP, lane), end - start, torch.bool, base.device)))
        piece.abs_()

    run_pieces(n, piece_length(base), fill, base.device)
    return full.view(base.shape).sum()


def select(sel: Selection, d: torch.Tensor, start: int, end: int, ctx: Context, lane: int = 0) -> None:
    """Sparsify the task vector piece d (elements [start, end)) in place, as mergekit's sparsify would."""
    if sel.zero:
        d.zero_()
        return
    if sel.keep is None:
        return
    keep = sel.keep(start, end, ctx.scratch((_KEEP, lane), end - start, torch.bool, d.device))
    on_device = d.device.type != "cpu"
    if sel.work is None or sel.work == d.dtype:
        d.mul_(keep)
        if sel.scale is not None:
            l1_norms_apply(d, sel.scale, on_device)
        return
    w = ctx.scratch((_WORK, lane), end - start, sel.work, d.device).copy_(d)
    w.mul_(keep)
    if sel.scale is not None:
        l1_norms_apply(w, sel.scale, on_device)
    d.copy_(w)


def generalized_merge(
    inputs: Inputs,
    shared: dict,
    per_input: list[dict],
    ctx: Context,
    sparsify: Sparsifier | None = None,
    consensus: bool = False,
) -> torch.Tensor:
    """The family's merge of one tensor; sparsify: TIES's or DARE's selection; consensus: TIES's sign consensus."""
    base = inputs.base
    others = [i for i in range(len(inputs.tensors)) if i != inputs.base_index]
    if not others:
        return base
    # Everything that needs whole tensors, in mergekit's order (DARE's draws follow it).
    selections = [sparsify(inputs, i, per_input[i]["density"], shared["rescale"], ctx) if sparsify else KEEP_ALL for i in others]

    m, n, dtype, device = len(others), base.numel(), base.dtype, base.device
    weights = torch.tensor([per_input[i]["weight"] for i in others], dtype=dtype, device=device).unsqueeze(-1)
    mask_dtype = torch.int8 if shared["int8_mask"] else dtype
    divisor = None
    if not consensus:
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)  # mergekit: divisor[divisor.abs() < 1e-8] = 1
    out = ctx.output_like(base)
    flat_base, flat_out = base.reshape(-1), out.view(-1)

    def combine(start: int, end: int, lane: int) -> None:
        c = end - start
        deltas = ctx.scratch((_DELTAS, lane), m * c, dtype, device).view(m, c)
        for row, (i, sel) in enumerate(zip(others, selections)):
            delta_piece(inputs, i, start, end, deltas[row])
            select(sel, deltas[row], start, end, ctx, lane)
        deltas.mul_(weights)
        mixed = ctx.scratch((_MIXED, lane), c, dtype, device)
        if consensus:
            div = _sign_consensus(deltas, weights, mask_dtype, mixed, ctx, lane)
        else:
            torch.sum(deltas, dim=0, out=mixed)
            div = divisor
        if shared["normalize"]:
            mixed.div_(div)
        if shared["lambda"] != 1:
            mixed.mul_(shared["lambda"])
        torch.add(flat_base[start:end], mixed, out=flat_out[start:end])

    run_pieces(n, piece_length(base), combine, device)
    return out


def _sign_consensus(deltas: torch.Tensor, weights: torch.Tensor, mask_dtype: torch.dtype, mixed: torch.Tensor,
                    ctx: Context, lane: int) -> torch.Tensor:
    """TIES's consensus on one piece of weighted task vectors [m, c]: mixed = the sum of the elements whose
    sign agrees with the sign of the sum; returns the divisor (the sum of their weights, 0 -> 1).
    mergekit's get_mask and its two sums, into scratch buffers."""
    m, c = deltas.shape
    dtype, device = deltas.dtype, deltas.device
    sign = torch.sign(deltas, out=ctx.scratch((_SIGN, lane), m * c, dtype, device).view(m, c))
    if mask_dtype != dtype:
        sign = ctx.scratch((_SIGN_MASK, lane), m * c, mask_dtype, device).view(m, c).copy_(sign)
    summed = torch.sum(deltas, dim=0, out=ctx.scratch((_SUMMED, lane), c, dtype, device))
    positive = torch.ge(summed, 0, out=ctx.scratch((_MAJORITY_BOOL, lane), c, torch.bool, device))
    majority = ctx.scratch((_MAJORITY, lane), c, mask_dtype, device).copy_(positive)
    majority.mul_(2).sub_(1)
    agree = torch.eq(sign, majority, out=ctx.scratch((_AGREE, lane), m * c, torch.bool, device).view(m, c))
    # x * agree promotes the bool mask to x's dtype (1 or 0) element by element, a slow path on the
    # CPU; converted once, both products below run on the fast same-dtype one (the same values)
    agree = ctx.scratch((_AGREE_AS_DTYPE, lane), m * c, dtype, device).view(m, c).copy_(agree)
    product = ctx.scratch((_PRODUCT, lane), m * c, dtype, device).view(m, c)
    torch.sum(torch.mul(deltas, agree, out=product), dim=0, out=mixed)
    divisor = torch.sum(torch.mul(weights, agree, out=product), dim=0, out=summed)
    divisor.masked_fill_(torch.eq(divisor, 0, out=positive), 1)  # mergekit: divisor[divisor == 0] = 1
    return divisor


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx)


METHOD = Method(
    name="task_arithmetic",
    params=PARAMS["task_arithmetic"],
    merge=merge,
    base="required",
)
