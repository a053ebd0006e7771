"""slerp: spherical interpolation between the base and one other model (mergekit 0.1.5).

Each tensor is one vector. With a = base, b = other, both flattened, in float32:
  cos(theta) = <a/|a|, b/|b|>  (clamped to [-1, 1])
  out = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b
or (1-t) a + t b when |cos(theta)| > 0.9995 (nearly colinear).

|a|, |b| and the dot product depend on the pair only, not on t: they are computed
once per pair (in mergekit's chunks, so they agree to the bit) and kept in the
cache; each candidate then costs one fused elementwise pass (search/engine/methods/fused.py).
"""

from __future__ import annotations

import torch

from search.engine.methods.base import Context, Inputs, Method, copy_safe, finite, pieces
from search.engine.methods.fused import weighted_sum
from search.engine.method_params import PARAMS

DOT_THRESHOLD = 0.9995
EPS = 1e-8
_STAT_CHUNK = 1024 * 1024  # mergekit's chunk for norms and dot (one tensor per batch)


def pair_statistics(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dot of the normalized vectors, clamped; is-colinear) for one pair, as [1, 1] tensors.

    x, y: two float32 scratch vectors (float64 for float64 tensors; `_stat_buffers`), at least one chunk
    long (or the tensor's length), that each chunk is converted into: reusing them
    instead of allocating per chunk halves the cost on the CPU (fresh memory is page faults)."""
    a = a.reshape(1, -1)
    b = b.reshape(1, -1)
    n = a.shape[1]

    def chunk(buffer: torch.Tensor, t: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return buffer[: e - s].view(1, -1).copy_(t[:, s:e])

    # Norms of per-chunk norms, then the dot of chunk-normalized pieces: the same
    # reductions in the same order as mergekit, so the coefficients match exactly.
    def norm(t: torch.Tensor) -> torch.Tensor:
        per_chunk = [torch.linalg.vector_norm(chunk(x, t, s, e), dim=1, keepdim=True) for s, e in pieces(n, _STAT_CHUNK)]
        whole = torch.linalg.vector_norm(torch.stack(per_chunk), dim=0)
        return torch.where(whole > EPS, whole, 1)

    norm_a, norm_b = norm(a), norm(b)
    dots = []
    for s, e in pieces(n, _STAT_CHUNK):
        pa = chunk(x, a, s, e).div_(norm_a)
        pb = chunk(y, b, s, e).div_(norm_b)
        dots.append(pa.mul_(pb).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    return dot, dot.abs() > DOT_THRESHOLD


def angle(dot: torch.Tensor, colinear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, sin(theta)) of a pair, as mergekit computes them: kept with the pair's statistics,
    so that a candidate launches only the kernels that depend on t (a GPU's cost is per launch)."""
    theta = torch.acos(torch.where(colinear, 0, dot))
    return theta, torch.sin(theta)


def coefficients(t: float, dot: torch.Tensor, colinear: torch.Tensor, theta_sin: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficient of a, coefficient of b) for one t, as [1, 1] tensors of the work dtype."""
    t = torch.tensor([t], dtype=dot.dtype, device=dot.device).reshape(-1, 1)
    theta, sin_theta = theta_sin or angle(dot, colinear)
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def selected_side(t: float, dtype: torch.dtype) -> str | None:
    """"a" when t rounds to 0 in the work dtype, "b" when it rounds to 1: then the coefficients are
    exactly (1, 0) or (0, 1) for any finite pair (sin(theta)/sin(theta) is 1, sin(0) is 0; colinear:
    1 - t and t). Other t may give them too (t that underflows in t * theta): those are computed,
    which stores the same bytes."""
    rounded = float(torch.tensor(t, dtype=dtype))
    return "a" if rounded == 0.0 else "b" if rounded == 1.0 else None


def merge(inputs: Inputs, shared: dict, per_input: list[dict], ctx: Context) -> torch.Tensor:
    if len(inputs.tensors) != 2 or inputs.base_index is None:
        raise ValueError("slerp needs the base model and exactly one other model")
    a = inputs.base
    b = inputs.tensors[1 - inputs.base_index]
    if not a.is_floating_point():
        raise TypeError("slerp needs floating-point tensors")
    if a.numel() == 0:
        return a.clone()
    dot, colinear, *theta_sin = ctx.cache.get(inputs.pair_key("slerp"), lambda: _pair_entry(a, b, ctx))
    coef_a, coef_b = coefficients(shared["t"], dot, colinear, tuple(theta_sin))

    # t that selects one side exactly: mergekit stores that side's bytes when the
    # other side's zero product cannot change them (no -0, NaN or inf involved).
    # Decided on the host from t alone, so that a GPU never waits for its coefficients.
    ka, kb = (inputs.keys[inputs.base_index], inputs.keys[1 - inputs.base_index])
    side = selected_side(shared["t"], dot.dtype)
    if side == "a":
        if copy_safe(ctx, ka, a) and finite(ctx, kb, b):
            return a
    elif side == "b":
        if copy_safe(ctx, kb, b) and finite(ctx, ka, a):
            return b

    out = ctx.output_like(a)
    weighted_sum(a, b, coef_a, coef_b, out, ctx)
    return out


def _pair_entry(a: torch.Tensor, b: torch.Tensor, ctx: Context) -> tuple:
    dot, colinear = pair_statistics(a, b, *_stat_buffers(a, ctx))
    return (dot, colinear, *angle(dot, colinear))


def _stat_buffers(a: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    size = min(a.numel(), _STAT_CHUNK)
    return ctx.scratch(3, size, dtype, a.device), ctx.scratch(4, size, dtype, a.device)


METHOD = Method(
    name="slerp",
    params=PARAMS["slerp"],
    merge=merge,
    base="required",
    min_inputs=2,
    max_inputs=2,
    passthrough_singleton=True,
)
