"""task_arithmetic, and the family it heads (ties, dare_ties, dare_linear), as mergekit 0.1.5 runs them.

With task vectors d_i = x_i - base (in the work dtype), optionally sparsified:
  out = base + lambda * sum_i w_i d_i [/ divisor when normalize]
where the divisor is sum_i w_i (or, with a sign consensus, the sum of the weights
that agree with the majority sign at each element). Weights are rounded to the
work dtype first, as mergekit does.

How it runs: on the CPU (bfloat16, float16; float32 over up to four task vectors), a C loop does a
piece's whole sequence per element, with every rounding mergekit's ops make (family_kernel.py).
Otherwise, and for a piece with a NaN:
mergekit's own sequence of torch ops, op for op and dtype for dtype (its bool masks and sums over
the models as equivalent ops on torch's fast paths, the same bits: mask_ops.py). Either way over
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
from functools import cached_property
from typing import Callable

import torch

from search.engine.method_params import PARAMS
from search.engine.methods import family_kernel, mask_ops
from search.engine.methods.base import CHUNK, DEVICE_PIECE, Context, Inputs, Method
from search.engine.methods.lanes import lane_count, run_pieces

EPS = 1e-7  # mergekit's rescale guard
# CPU pieces: a quarter of CHUNK. The pass keeps ~16 bytes an element per model in scratch (float32 copies,
# masks, products: mask_ops.py); of CHUNK / 16, / 8 and / 4, a quarter ran fastest here.
FAMILY_PIECE = CHUNK // 4
# Scratch slots (Context.scratch) of this family's passes.
_DELTAS, _MIXED, _DIVISOR, _WORK, _KEEP, _FULL, _MASK_OPS = range(10, 17)


@dataclass(frozen=True, eq=False)
class KeptBelow:
    """A kept-mask that is `values < bound` (TIES's ranks, DARE's draws; values None: every element kept):
    keep(start, end, out) for the torch ops, and readable by the C loop (family_kernel.py)."""

    values: torch.Tensor | None
    bound: int

    def __call__(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            return out.fill_(1)
        return torch.lt(self.values[start:end], self.bound, out=out)


@dataclass
class Selection:
    """How one task vector is sparsified for this candidate (mergekit's `sparsify`)."""

    # writes the kept-mask of elements [s, e) as 1s and 0s into an integer piece (mask_ops.flag_dtype)
    keep: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None
    zero: bool = False  # torch.zeros_like (density <= 0 under TIES): +0 everywhere, not delta * 0
    work: torch.dtype | None = None  # the dtype masking and rescaling run in (DARE: float32 for float16 on the CPU)
    scale: tuple[torch.Tensor, torch.Tensor] | None = None  # DARE's L1 norms (before, after masking), 0-dim

    @cached_property
    def host_factor(self) -> float | None:
        """The rescale factor before / after as a Python float (on the CPU, the same product as by the
        0-dim tensor, on torch's fast path), settled once per tensor; None where mergekit leaves the
        masked vector as it is (either norm under EPS)."""
        before, after = self.scale
        return None if before < EPS or after < EPS else float(before / after)


KEEP_ALL = Selection()

# sparsify(inputs, input index, density, rescale, ctx) -> Selection
Sparsifier = Callable[[Inputs, int, float, bool, Context], Selection]


def piece_length(t: torch.Tensor) -> int:
    return FAMILY_PIECE if t.device.type == "cpu" else DEVICE_PIECE


def pieces_in_flight(device: torch.device | str) -> int:
    """Elements of the pass's pieces held at once on `device` (their scratch: memory_estimate.py): a
    piece per CPU lane, one large one on an accelerator."""
    return lane_count(device) * FAMILY_PIECE if torch.device(device).type == "cpu" else DEVICE_PIECE


def delta_piece(inputs: Inputs, i: int, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
    """out = (x_i - base)[start:end], the task vector's piece, in the work dtype."""
    return torch.sub(inputs.tensors[i].reshape(-1)[start:end], inputs.base.reshape(-1)[start:end], out=out)


def l1_norms_apply(masked: torch.Tensor, sel: Selection, on_device: bool) -> torch.Tensor:
    """masked * (before / after), unless either norm is under EPS (mergekit's rescaled_masked_tensor), in place.
    mergekit branches on the norms in Python, which on a GPU waits for both sums; the same choice
    made on the device (on_device) gives the same values without waiting."""
    if not on_device:
        if sel.host_factor is not None:
            masked.mul_(sel.host_factor)
        return masked
    before, after = sel.scale
    return torch.where((before < EPS) | (after < EPS), masked, masked * (before / after), out=masked)


def l1_norm(inputs: Inputs, i: int, work: torch.dtype, keep, ctx: Context) -> torch.Tensor:
    """|x_i - base| (masked by keep, if given) summed over the whole tensor, in `work`: torch's own sum
    of a tensor of the input's shape on this thread, so the same additions (and last bits) as mergekit's."""
    base = inputs.base
    n = base.numel()
    full = ctx.scratch(_FULL, n, work, base.device)

    lib = family_kernel.library() if _loop_takes([inputs.tensors[i], base], work) else None
    described = _loop_keep(keep) if lib is not None else None

    def fill(start: int, end: int, lane: int) -> None:
        if described is not None and family_kernel.masked_abs(lib, inputs.tensors[i], base, described, full, start, end):
            return
        piece = full[start:end]
        if work == base.dtype:
            delta_piece(inputs, i, start, end, piece)
        else:
            piece.copy_(delta_piece(inputs, i, start, end, ctx.scratch((_DELTAS, lane), end - start, base.dtype, base.device)))
        if keep is not None:
            piece.mul_(kept_mask(keep, start, end, piece, ctx, lane))
        piece.abs_()

    run_pieces(n, piece_length(base), fill, base.device)
    return full.view(base.shape).sum()


def kept_mask(keep, start: int, end: int, like: torch.Tensor, ctx: Context, lane: int) -> torch.Tensor:
    """The kept-mask of elements [start, end) as the 1s and 0s of like's dtype: what mergekit's
    `x * mask` multiplies a bool mask as (the bool itself is a slow path of torch's on the CPU)."""
    flags = ctx.scratch((_KEEP, lane), end - start, mask_ops.flag_dtype(like.dtype), like.device)
    return mask_ops.as_mask(keep(start, end, flags), like.dtype)


def select(sel: Selection, d: torch.Tensor, start: int, end: int, ctx: Context, lane: int = 0) -> None:
    """Sparsify the task vector piece d (elements [start, end)) in place, as mergekit's sparsify would."""
    if sel.zero:
        d.zero_()
        return
    if sel.keep is None:
        return
    on_device = d.device.type != "cpu"
    w = d if sel.work is None or sel.work == d.dtype else ctx.scratch((_WORK, lane), end - start, sel.work, d.device).copy_(d)
    w.mul_(kept_mask(sel.keep, start, end, w, ctx, lane))
    if sel.scale is not None:
        l1_norms_apply(w, sel, on_device)
    if w is not d:
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
    divisor = None
    if not consensus:
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)  # mergekit: divisor[divisor.abs() < 1e-8] = 1
    out = ctx.output_like(base)
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    acc_weights = weights.to(mask_ops.acc_dtype(dtype))

    call = _family_call(inputs, others, selections, shared, weights, divisor, consensus, out)

    def combine(start: int, end: int, lane: int) -> None:
        if call is not None and call.run(start, end):
            return  # the C loop built it (else it met a NaN: the torch ops below build the piece)
        c = end - start
        deltas = ctx.scratch((_DELTAS, lane), m * c, dtype, device).view(m, c)
        for row, (i, sel) in enumerate(zip(others, selections)):
            delta_piece(inputs, i, start, end, deltas[row])
            select(sel, deltas[row], start, end, ctx, lane)
        deltas.mul_(weights)
        mixed = ctx.scratch((_MIXED, lane), c, dtype, device)

        def scratch(slot: int, numel: int, dt: torch.dtype) -> torch.Tensor:
            return ctx.scratch((_MASK_OPS, slot, lane), numel, dt, device)

        if consensus:  # int8_mask only changes the dtype mergekit holds the signs in: the same mask
            div = mask_ops.sign_consensus(deltas, acc_weights, mixed, ctx.scratch((_DIVISOR, lane), c, dtype, device), scratch)
        else:
            mask_ops.sum_models(deltas, mixed, scratch)
            div = divisor
        if shared["normalize"]:
            mixed.div_(div)
        if shared["lambda"] != 1:
            mixed.mul_(shared["lambda"])
        torch.add(flat_base[start:end], mixed, out=flat_out[start:end])

    run_pieces(n, piece_length(base), combine, device)
    return out


def _loop_takes(tensors: list[torch.Tensor], work: torch.dtype | None, models: int = 1) -> bool:
    """Whether the C loop (family_kernel.py) can build passes over these tensors (of `models` task vectors):
    of one dtype it builds, on the CPU, contiguous; work: the dtype masking and rescaling run in (None:
    theirs; float32 for float16's DARE, whose one rounding back to float16 the loop makes too)."""
    dtype = tensors[0].dtype
    if not family_kernel.builds(dtype, models) or work not in (None, dtype, torch.float32):
        return False
    return all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def _loop_keep(keep) -> tuple[int, int, int] | None:
    """A kept-mask (Selection.keep; None: all kept) as the C loop takes it, or None when the loop cannot."""
    if keep is None or (isinstance(keep, KeptBelow) and keep.values is None):
        return family_kernel.KEEP_ALL, 0, 0
    if not isinstance(keep, KeptBelow):
        return None
    values = keep.values
    if values.device.type != "cpu" or not values.is_contiguous() or values.dtype not in (torch.int16, torch.int32):
        return None
    return family_kernel.KEEP_BELOW_I16 if values.dtype == torch.int16 else family_kernel.KEEP_BELOW_I32, values.data_ptr(), keep.bound


def _family_call(inputs: Inputs, others: list[int], selections: list[Selection], shared: dict, weights: torch.Tensor,
                 divisor: torch.Tensor | None, consensus: bool, out: torch.Tensor) -> family_kernel.FamilyCall | None:
    """The C loop bound to this tensor's merge, or None where the torch ops build it."""
    xs = [inputs.tensors[i] for i in others]
    if not all(_loop_takes([inputs.base, out, *xs], work, len(xs)) for work in {sel.work for sel in selections}):
        return None
    keeps = [(family_kernel.KEEP_ZERO, 0, 0) if sel.zero else _loop_keep(sel.keep) for sel in selections]
    lib = family_kernel.library() if all(k is not None for k in keeps) else None
    if lib is None:
        return None
    factors = [sel.host_factor if sel.scale is not None else None for sel in selections]
    return family_kernel.FamilyCall(lib, inputs.base, xs, keeps, factors, [float(w) for w in weights], consensus, shared["normalize"],
                                    1.0 if divisor is None else float(divisor), float(shared["lambda"]), out)


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx)


METHOD = Method(
    name="task_arithmetic",
    params=PARAMS["task_arithmetic"],
    merge=merge,
    base="required",
)
