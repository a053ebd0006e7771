"""ties: task vectors trimmed to their largest-magnitude `density` share, then summed
over the elements whose sign agrees with the weighted majority (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import Context, Inputs, Method
from search.engine.methods.task_arithmetic import generalized_merge, rescaled_masked


def magnitude(delta: torch.Tensor, density: float, rescale: bool, ctx: Context, key) -> torch.Tensor:
    """Keep the k = max(1, int(density * n)) largest |delta|; zero the rest."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))

    def order() -> torch.Tensor:
        w = delta.abs().reshape(-1)
        if w.device.type == "cpu":
            w = w.float()
        return torch.argsort(w, descending=True)

    # The ranking depends on the task vector only, not on density: sort once.
    ranking = ctx.cache.get(None if key is None else ("magnitude-order", key), order)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[ranking[:k]] = 1
    return rescaled_masked(delta, mask.reshape_as(delta), rescale)


def sign_consensus(deltas: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Elements whose sign matches the sign of the summed (weighted) task vectors."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=magnitude, consensus=sign_consensus)


METHOD = Method(
    name="ties",
    params=PARAMS["ties"],
    merge=merge,
    base="required",
)
