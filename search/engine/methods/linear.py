"""linear: a weighted average of the inputs (mergekit 0.1.5 `linear`).

out = sum_i w_i * x_i / sum_i w_i   (the division only with normalize: true),
accumulated in float32 (float64 for float64 inputs), rounded once at the end.
"""

from __future__ import annotations

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import Context, Inputs, Method, copy_safe, finite, piece_size
from search.engine.methods.lanes import run_pieces


def selected_input(inputs: Inputs, weights: list[float], normalize: bool, ctx: Context) -> int | None:
    """The input the result equals to the byte, if the weights pick exactly one (1 and 0s)."""
    ones = [i for i, w in enumerate(weights) if w == 1.0]
    if len(ones) != 1 or any(w != 0.0 for i, w in enumerate(weights) if i != ones[0]):
        return None
    i = ones[0]
    if not copy_safe(ctx, inputs.keys[i], inputs.tensors[i]) or not all(finite(ctx, inputs.keys[j], inputs.tensors[j]) for j in range(len(weights)) if j != i):
        return None
    return i


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    first = inputs.tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = [p["weight"] for p in per_input]
    normalize = shared["normalize"]
    pick = selected_input(inputs, weights, normalize, ctx)
    if pick is not None:
        return inputs.tensors[pick]

    # Coefficients as mergekit packs them: one float32 row, summed by torch.
    w = torch.tensor([weights], dtype=acc_dtype, device=first.device)
    denominator = w.sum(dim=1).reshape(1)
    coefs = [c.reshape(1) for c in w.unbind(1)]

    out = ctx.output_like(first)
    flat_out = out.view(-1)
    flats = [t.reshape(-1) for t in inputs.tensors]
    on_cpu = first.device.type == "cpu"

    def accumulate(start: int, end: int, lane: int) -> None:
        acc = ctx.scratch((0, lane), end - start, acc_dtype, first.device)
        acc.zero_()
        for x, c in zip(flats, coefs):
            if on_cpu:
                # Converting first is what torch does for a mixed-dtype addcmul_; done here
                # explicitly, the addcmul_ itself runs on its fast same-dtype path.
                piece = ctx.scratch((1, lane), end - start, acc_dtype, first.device)
                piece.copy_(x[start:end])
                acc.addcmul_(piece, c)
            else:
                # mergekit's own op on its own operands: CUDA's addcmul_ is one fma per element
                # (a + x * c rounded once), converting x in the kernel; one pass, no scratch copy.
                acc.addcmul_(x[start:end], c)
        if normalize:
            acc.div_(denominator)
        flat_out[start:end].copy_(acc)

    run_pieces(flat_out.numel(), piece_size(flat_out), accumulate, first.device)
    return out


METHOD = Method(
    name="linear",
    params=PARAMS["linear"],
    merge=merge,
)
