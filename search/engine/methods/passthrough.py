"""passthrough: one input, copied as is or multiplied by its `scale` (mergekit 0.1.5).

Layer stacking (SOLAR, interleaving) is passthrough without scale: the output
tensor is the source tensor itself, so in memory it is aliased, never copied.
Block expansion sets `scale: 0` on o_proj/down_proj of the copied layers.
"""

from __future__ import annotations

import torch

from search.engine.methods.base import Context, Inputs, Method
from search.engine.method_params import PARAMS


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    (x,) = inputs.tensors
    scale = per_input[0]["scale"]
    if scale is None:
        return x
    # x * 1.0 is x to the byte unless x holds NaN (whose payload may change).
    if scale == 1.0 and not _has_nan(ctx, inputs.keys[0], x):
        return x
    return torch.mul(x, scale, out=ctx.output_like(x))


def _has_nan(ctx: Context, key, x: torch.Tensor) -> bool:
    return ctx.cache.get(None if key is None else ("has-nan", key), lambda: bool(torch.isnan(x).any()))


METHOD = Method(
    name="passthrough",
    params=PARAMS["passthrough"],
    merge=merge,
    max_inputs=1,
)
