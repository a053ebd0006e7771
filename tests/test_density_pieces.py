"""The task-arithmetic family (task_arithmetic, ties, dare_ties, dare_linear) on tensors of many pieces,
against mergekit 0.1.5's own kernel (`merge_tensors`), bit for bit.

The engine runs mergekit's ops piece by piece and reuses what a candidate does not change (TIES's
ranks, DARE's draws, replayed from the generator's state): these tests give it tensors of several
pieces with ragged ends, signed zeros, NaN and ties in magnitude, several candidates in a row on one
cache (so the second and later candidates take the reused ranks and draws), and every option of the
family, in bfloat16, float16 and float32.
"""

from __future__ import annotations

import pytest
import torch

from search.engine.methods import BUILT_IN, Context, Inputs, StatCache

SHAPE = (613, 500)  # 306500 elements: four pieces and a ragged fifth


def _family(dtype: torch.dtype, models: int, seed: int = 0, nan: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(dtype)
    out = [base]
    for k in range(models):
        ft = (base.float() + torch.randn(SHAPE, generator=g) * 0.002).to(dtype)
        flat = ft.view(-1)
        flat[k * 1000 : k * 1000 + 500] = base.view(-1)[k * 1000 : k * 1000 + 500]  # exact zeros in the delta
        if nan:
            flat[70_000 + k] = float("nan")
        out.append(ft)
    out[0].view(-1)[200_000:200_100] = -0.0
    return out


def _mergekit(method: str, xs, params: dict, seed: int | None) -> torch.Tensor:
    from mergekit.merge_methods.api import merge_tensors

    if seed is not None:
        torch.manual_seed(seed)
    return merge_tensors(xs, method, parameters=params, base_index=0)


def _ours(method: str, xs, params: dict, ctx: Context, keys) -> torch.Tensor:
    m = BUILT_IN[method]
    shared = {p.name: params.get(p.name, p.default) for p in m.params if p.scope == "shared"}
    per_input = [{}] + [{p.name: (params[p.name][k] if isinstance(params.get(p.name), list) else params.get(p.name, p.default))
                         for p in m.params if p.scope == "non_base"} for k in range(len(xs) - 1)]
    return m.merge(Inputs("w", xs, keys, 0), shared, per_input, ctx)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


CASES = [
    ("task_arithmetic", {"weight": [0.7, 0.4]}),
    ("task_arithmetic", {"weight": [0.7, -0.7], "normalize": True, "lambda": 1.3}),
    ("ties", {"weight": [1.0, 0.5], "density": [0.3, 0.6]}),
    ("ties", {"weight": [0.6, 0.4], "density": [0.5, 1.0], "int8_mask": True, "normalize": False}),
    ("ties", {"weight": [0.6, 0.4], "density": [0.2, 0.7], "rescale": True, "lambda": 0.9}),
    ("ties", {"weight": [0.6, 0.4], "density": [0.0, 1e-7]}),
    ("dare_ties", {"weight": [0.7, 0.4], "density": [0.5, 0.7]}),
    ("dare_ties", {"weight": [0.5, 0.5], "density": [0.3, 0.6], "rescale": False, "normalize": True, "int8_mask": True}),
    ("dare_linear", {"weight": [0.7, 0.4], "density": [0.4, 1.0], "lambda": 1.1}),
    ("dare_linear", {"weight": [0.7, 0.4], "density": [0.0, 0.001]}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_pieces_and_reuse_match_mergekit(method, params, dtype, one_torch_thread):
    _check(method, params, dtype)


@pytest.mark.parametrize("method,params", [CASES[2], CASES[4], CASES[6], CASES[8]], ids=["ties", "ties-rescale", "dare_ties", "dare_linear"])
def test_two_lanes_give_the_same_bits(method, params):
    """With two torch threads the piece loops run in two lanes (search/engine/methods/lanes.py), and
    mergekit's whole-tensor sums with two threads: still the same bytes. (Without NaN: mergekit's ops
    split each tensor between torch's threads at an arbitrary element, which then takes the scalar
    path instead of the vector one, and a NaN's sign bit there can differ between the two.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(method, params, torch.bfloat16, nan=False)
    finally:
        torch.set_num_threads(before)


def _check(method: str, params: dict, dtype: torch.dtype, nan: bool = True) -> None:
    xs = _family(dtype, 2, nan=nan)
    seed = 7 if method.startswith("dare") else None
    cache = StatCache()
    keys = [("base", dtype), ("a", dtype), ("b", dtype)]
    # Three candidates in a row on one cache: the first computes ranks and draws, the others reuse
    # them; two tensors per candidate, so that the second one's draws start mid-stream.
    for shift in (0.0, 0.1, -0.05):
        p = dict(params)
        if "density" in p:
            p["density"] = [d if d in (0.0, 1.0) or d < 0.01 else round(d + shift, 3) for d in p["density"]]
        if seed is not None:
            torch.manual_seed(seed)
        want = [_mergekit(method, xs, p, None) for _ in range(2)]
        cache.new_candidate()
        ctx = Context(cache=cache, generator=None if seed is None else torch.Generator().manual_seed(seed))
        got = [_ours(method, xs, p, ctx, keys) for _ in range(2)]
        for g, w in zip(got, want):
            assert _same(g, w), (method, p, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_draws_against_a_float32_density_are_kept_whole(dtype, monkeypatch, one_torch_thread):
    """float16 and float32 DARE draw against a float32 density, which the top 16 bits of a draw do not
    decide: the draws are kept whole (int32), so a second candidate with other densities draws none
    and still gives mergekit's bits."""
    from search.engine.methods.random_stream import RandomStream

    drawn = []
    uniform_bits = RandomStream.uniform_bits
    monkeypatch.setattr(RandomStream, "uniform_bits", lambda self, n, out, ctx: drawn.append(n) or uniform_bits(self, n, out, ctx))
    xs = _family(dtype, 2, nan=False)
    cache = StatCache()
    per_candidate = []
    for densities in ([0.437, 0.611], [0.523, 0.389]):
        params = {"weight": [0.7, 0.4], "density": densities}
        want = _mergekit("dare_linear", xs, params, seed=7)
        cache.new_candidate()
        ctx = Context(cache=cache, generator=torch.Generator().manual_seed(7))
        before = len(drawn)
        assert _same(_ours("dare_linear", xs, params, ctx, [("base",), ("a",), ("b",)]), want)
        per_candidate.append(sum(drawn[before:]))
    assert per_candidate == [2 * xs[0].numel(), 0]
