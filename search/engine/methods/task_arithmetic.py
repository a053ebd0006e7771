"""task_arithmetic, and the family it heads (ties, dare_ties, dare_linear), as mergekit 0.1.5 runs them.

With task vectors d_i = x_i - base (in the work dtype), optionally sparsified:
  out = base + lambda * sum_i w_i d_i [/ divisor when normalize]
where the divisor is sum_i w_i (or, with a sign consensus, the sum of the weights
that agree with the majority sign at each element). Weights are rounded to the
work dtype first, as mergekit does.

Task vectors depend only on the pair (fine-tune, base): they are computed once
and kept in the cache across candidates.
"""

from __future__ import annotations

from typing import Callable

import torch

from search.engine.methods.base import Context, Inputs, Method
from search.engine.method_params import PARAMS

# sparsify(delta, density, rescale, ctx, cache_key) -> delta
Sparsifier = Callable[[torch.Tensor, float, bool, Context, object], torch.Tensor]
# consensus(weighted_deltas, mask_dtype) -> bool mask of the elements that agree
Consensus = Callable[[torch.Tensor, torch.dtype], torch.Tensor]


def rescaled_masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7,
                    on_device: bool | None = None) -> torch.Tensor:
    """tensor * mask, scaled back to the L1 norm of tensor when rescale (DARE's rescaling).
    on_device: decide on the device whether to scale (default: off the CPU)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    # mergekit branches on `before < eps or after < eps` in Python, which on a GPU waits for
    # both sums; the same choice made on the device gives the same values without waiting.
    if not (tensor.device.type != "cpu" if on_device is None else on_device):
        return masked if (before < eps or after < eps) else masked * (before / after)
    return torch.where((before < eps) | (after < eps), masked, masked * (before / after))


def task_vector(inputs: Inputs, i: int, ctx: Context) -> torch.Tensor:
    key = None
    if inputs.keys[i] is not None and inputs.keys[inputs.base_index] is not None:
        key = ("task-vector", inputs.keys[i], inputs.keys[inputs.base_index])
    return ctx.cache.get(key, lambda: inputs.tensors[i] - inputs.base)


def generalized_merge(
    inputs: Inputs,
    shared: dict,
    per_input: list[dict],
    ctx: Context,
    sparsify: Sparsifier | None = None,
    consensus: Consensus | None = None,
) -> torch.Tensor:
    base = inputs.base
    others = [i for i in range(len(inputs.tensors)) if i != inputs.base_index]
    if not others:
        return base

    deltas = base.new_empty((len(others), *base.shape))
    for row, i in enumerate(others):
        delta = task_vector(inputs, i, ctx)
        if sparsify is not None:
            key = (inputs.keys[i], inputs.keys[inputs.base_index]) if inputs.keys[i] is not None else None
            delta = sparsify(delta, per_input[i]["density"], shared["rescale"], ctx, key)
        deltas[row] = delta
        del delta

    weights = torch.tensor([per_input[i]["weight"] for i in others], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)

    if consensus is not None:
        mask = consensus(deltas, torch.int8 if shared["int8_mask"] else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        # mergekit writes divisor[divisor == 0] = 1: the same values, but a boolean-mask
        # assignment is a host round trip on a GPU (it counts the mask first); masked_fill_ is not
        divisor.masked_fill_(divisor == 0, 1)
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < 1e-8, 1)
    del deltas

    if shared["normalize"]:
        mixed /= divisor
    if shared["lambda"] != 1:
        mixed *= shared["lambda"]
    if mixed.dtype == base.dtype:
        return torch.add(base, mixed, out=ctx.output_like(base))
    return (base + mixed).to(base.dtype)


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx)


METHOD = Method(
    name="task_arithmetic",
    params=PARAMS["task_arithmetic"],
    merge=merge,
    base="required",
)
