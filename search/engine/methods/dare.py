"""dare_ties and dare_linear: task vectors with a random `density` share of elements kept
(Bernoulli), rescaled to the original L1 norm, then summed (dare_linear) or summed with
TIES's sign consensus (dare_ties), as mergekit 0.1.5 runs them.

The draws come from `ctx.generator`, seeded like mergekit's `--random-seed`; the
engine runs tensors in mergekit's order so each one sees the same stream.
"""

from __future__ import annotations

import torch

from search.engine.method_params import PARAMS
from search.engine.methods.base import Context, Inputs, Method
from search.engine.methods.task_arithmetic import generalized_merge, rescaled_masked
from search.engine.methods.ties import sign_consensus


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, ctx: Context, key) -> torch.Tensor:
    if density >= 1:
        return delta  # no draw at all: the stream is not advanced
    # torch has no CPU bernoulli for float16: mergekit draws in float32 there.
    work = delta.dtype if (delta.device.type != "cpu" or delta.dtype == torch.bfloat16) else torch.float32
    p = torch.full_like(delta, density, dtype=work)
    mask = torch.bernoulli(p, generator=ctx.generator)
    return rescaled_masked(delta.to(work), mask, rescale).to(delta.dtype)


def merge_linear(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=bernoulli)


def merge_ties(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    return generalized_merge(inputs, shared, per_input, ctx, sparsify=bernoulli, consensus=sign_consensus)


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
