"""slerp: spherical interpolation between the base and one other model (mergekit 0.1.5).

Each tensor is one vector. With a = base, b = other, both flattened, in float32:
  cos(theta) = <a/|a|, b/|b|>  (clamped to [-1, 1])
  out = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b
or (1-t) a + t b when |cos(theta)| > 0.9995 (nearly colinear).

|a|, |b| and the dot product depend on the pair only, not on t: they are computed
once per pair (in mergekit's chunks, so they agree to the bit) and kept in the
cache; each candidate then costs one fused elementwise pass (search/methods/fused.py).
"""

from __future__ import annotations

import torch

from search.methods.base import Context, Inputs, Method, copy_safe, finite, pieces
from search.methods.fused import weighted_sum
from search.parameters import ParamSpec

DOT_THRESHOLD = 0.9995
EPS = 1e-8
_STAT_CHUNK = 1024 * 1024  # mergekit's chunk for norms and dot (one tensor per batch)


def pair_statistics(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dot of the normalized vectors, clamped; is-colinear) for one pair, as [1, 1] tensors."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a = a.reshape(1, -1)
    b = b.reshape(1, -1)
    # Norms of per-chunk norms, then the dot of chunk-normalized pieces: the same
    # reductions in the same order as mergekit, so the coefficients match exactly.
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in pieces(a.shape[1], _STAT_CHUNK)]),
        dim=0,
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, s:e].to(dtype), dim=1, keepdim=True) for s, e in pieces(b.shape[1], _STAT_CHUNK)]),
        dim=0,
    )
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dots = [
        ((a[:, s:e].to(dtype) / norm_a) * (b[:, s:e].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
        for s, e in pieces(a.shape[1], _STAT_CHUNK)
    ]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    return dot, dot.abs() > DOT_THRESHOLD


def coefficients(t: float, dot: torch.Tensor, colinear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficient of a, coefficient of b) for one t, as [1, 1] tensors of the work dtype."""
    t = torch.tensor([t], dtype=dot.dtype, device=dot.device).reshape(-1, 1)
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    if len(inputs.tensors) != 2 or inputs.base_index is None:
        raise ValueError("slerp needs the base model and exactly one other model")
    a = inputs.base
    b = inputs.tensors[1 - inputs.base_index]
    if not a.is_floating_point():
        raise TypeError("slerp needs floating-point tensors")
    if a.numel() == 0:
        return a.clone()
    dot, colinear = ctx.cache.get(inputs.pair_key("slerp"), lambda: pair_statistics(a, b))
    coef_a, coef_b = coefficients(shared["t"], dot, colinear)

    # t that selects one side exactly: mergekit stores that side's bytes when the
    # other side's zero product cannot change them (no -0, NaN or inf involved).
    ka, kb = (inputs.keys[inputs.base_index], inputs.keys[1 - inputs.base_index])
    if float(coef_a) == 1.0 and float(coef_b) == 0.0:
        if copy_safe(ctx, ka, a) and finite(ctx, kb, b):
            return a
    elif float(coef_a) == 0.0 and float(coef_b) == 1.0:
        if copy_safe(ctx, kb, b) and finite(ctx, ka, a):
            return b

    out = ctx.output_like(a)
    weighted_sum(a, b, coef_a, coef_b, out, ctx)
    return out


METHOD = Method(
    name="slerp",
    params=(ParamSpec("t", float, "shared"),),
    merge=merge,
    base="required",
    min_inputs=2,
    max_inputs=2,
    passthrough_singleton=True,
)
