"""search/engine/methods/family_kernel.py: the family's C loop against the torch ops it replaces and
against mergekit, bit for bit.

The loop builds bfloat16, float16 and float32 pieces of task_arithmetic, TIES, DARE-TIES and DARE-linear on the CPU; a
piece that meets a NaN goes back to the torch ops. Here each method and option runs with the loop
and without it (MERGESEARCH_KERNEL=0) on values that probe every rounding (ties in magnitude, zeros
of both signs, infinities, subnormals, large and tiny deltas, ragged lengths), on several candidates
in a row (ranks and draws reused), and once with no C compiler at all.
"""

from __future__ import annotations

import pytest
import torch

from test_density_pieces import _ours

from search.engine.methods import Context, StatCache, family_kernel

SHAPE = (613, 500)  # four pieces and a ragged fifth


def _family(models: int, seed: int, nan: bool, inf: bool = False, dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """A base and fine-tunes of it; with inf, infinities (a rescaled vector then has a non-finite norm,
    and its pieces go back to the torch ops); with nan, a NaN in one piece."""
    g = torch.Generator().manual_seed(seed)
    tiny = torch.finfo(dtype).tiny
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(dtype)
    out = [base]
    for k in range(models):
        scale = torch.exp(torch.randn(SHAPE, generator=g) * 4) * 0.002  # deltas over many binades
        ft = (base.float() + torch.randn(SHAPE, generator=g) * scale).clamp(-1e4, 1e4).to(dtype)
        flat = ft.view(-1)
        flat[k * 1000 : k * 1000 + 500] = base.view(-1)[k * 1000 : k * 1000 + 500]  # zero deltas
        if inf:
            flat[3000 + k : 3100 : 7] = float("inf") if k % 2 == 0 else -float("inf")
        flat[5000 + k * 50 : 5050 + k * 50] = tiny / 8  # subnormal
        if nan:
            flat[250_000 + k] = float("nan")  # one piece goes back to the torch ops
        out.append(ft)
    out[0].view(-1)[200_000:200_100] = -0.0
    out[0].view(-1)[5000:5100] = -tiny / 4
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16)


CASES = [
    ("task_arithmetic", {"weight": [0.7, 0.4, -0.3]}),
    ("task_arithmetic", {"weight": [0.7, -0.7, 0.2], "normalize": True, "lambda": 1.3}),
    ("ties", {"weight": [1.0, 0.5, 0.3], "density": [0.3, 0.6, 1.0]}),
    ("ties", {"weight": [0.6, 0.4, 0.0], "density": [0.5, 0.2, 0.9], "int8_mask": True, "normalize": False}),
    ("ties", {"weight": [0.6, 0.4, 0.5], "density": [0.2, 0.7, 0.4], "rescale": True, "lambda": 0.9}),
    ("ties", {"weight": [0.6, 0.4, 0.5], "density": [0.0, 1e-7, 0.5]}),
    ("dare_ties", {"weight": [0.7, 0.4, 0.5], "density": [0.5, 0.7, 0.2]}),
    ("dare_ties", {"weight": [0.5, 0.5, 0.5], "density": [0.3, 0.6, 1.0], "rescale": False, "normalize": True}),
    ("dare_linear", {"weight": [0.7, 0.4, 0.2], "density": [0.4, 1.0, 0.999], "lambda": 1.1}),
    ("dare_linear", {"weight": [0.7, 0.4, 0.2], "density": [0.0, 0.001, 0.5]}),
]


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IDS = ["bf16", "f16", "f32"]


def _loop_builds(dtype: torch.dtype) -> None:
    if not family_kernel.builds(dtype):
        pytest.skip("no C compiler here: the torch ops build every piece (tested everywhere else)")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("hostile", [False, True], ids=["finite", "inf-and-nan"])
@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_the_c_loop_gives_the_torch_ops_bits(method, params, hostile, dtype, monkeypatch, one_torch_thread):
    _loop_builds(dtype)
    xs = _family(3, seed=len(method), nan=hostile, inf=hostile, dtype=dtype)
    seed = 7 if method.startswith("dare") else None
    keys = [("base",), ("a",), ("b",), ("c",)]
    results = {}
    for loop in ("on", "off"):
        if loop == "off":
            monkeypatch.setenv("MERGESEARCH_KERNEL", "0")
        cache, got = StatCache(), []
        for shift in (0.0, 0.1, -0.05):  # three candidates on one cache: ranks and draws reused
            p = dict(params)
            if "density" in p:
                p["density"] = [d if d in (0.0, 1.0) or d < 0.01 else round(d + shift, 3) for d in p["density"]]
            cache.new_candidate()
            ctx = Context(cache=cache, generator=None if seed is None else torch.Generator().manual_seed(seed))
            got += [_ours(method, xs, p, ctx, keys) for _ in range(2)]
        results[loop] = got
    for with_loop, torch_ops in zip(results["on"], results["off"]):
        assert torch.equal(_bits(with_loop), _bits(torch_ops))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("method,params", [CASES[2], CASES[6], CASES[8]], ids=["ties", "dare_ties", "dare_linear"])
def test_the_c_loop_gives_mergekits_bits(method, params, dtype, one_torch_thread):
    from mergekit.merge_methods.api import merge_tensors

    _loop_builds(dtype)
    xs = _family(3, seed=1, nan=False, dtype=dtype)
    seed = 7 if method.startswith("dare") else None
    if seed is not None:
        torch.manual_seed(seed)
    want = merge_tensors(xs, method, parameters=params, base_index=0)
    ctx = Context(cache=StatCache(), generator=None if seed is None else torch.Generator().manual_seed(seed))
    assert torch.equal(_bits(_ours(method, xs, params, ctx, [None] * 4)), _bits(want))


def test_without_a_compiler_the_torch_ops_build_it(monkeypatch, tmp_path, one_torch_thread):
    from mergekit.merge_methods.api import merge_tensors

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MERGESEARCH_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(family_kernel, "_tried", False)
    monkeypatch.setattr(family_kernel, "_library", None)
    assert family_kernel.library() is None
    xs = _family(2, seed=3, nan=False)
    params = {"weight": [1.0, 0.5], "density": [0.3, 0.6]}
    want = merge_tensors(xs, "ties", parameters=params, base_index=0)
    assert torch.equal(_bits(_ours("ties", xs, params, Context(cache=StatCache()), [None] * 3)), _bits(want))


@pytest.mark.parametrize("dtype", DTYPES[:2], ids=IDS[:2])
def test_every_value_converts_and_rounds_as_torch_does(dtype, monkeypatch, one_torch_thread):
    """Every finite value of the dtype as a task vector over a zero base and over a base of other values,
    times weights whose products land on every rounding case (halfway ones too: x * 0.5 of an odd
    subnormal, x * 0.75 of an odd mantissa), normalized: the loop's own conversions (float16's are
    integer and float ops, not the compiler's) against torch's, bit for bit. Weights of at most 1 keep
    NaN out (inf - inf), so that the loop, not the torch ops, builds every piece."""
    _loop_builds(dtype)
    built = []
    run = family_kernel.FamilyCall.run
    monkeypatch.setattr(family_kernel.FamilyCall, "run", lambda self, s, e: built.append(run(self, s, e)) or built[-1])
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)]
    for base in (torch.zeros_like(every), every.flip(0)):
        xs = [base, every, every.roll(1)]
        for weights in ([0.5, 0.75], [1.0, -0.1], [-0.3, 1e-3]):
            params = {"weight": weights, "normalize": True}
            results = []
            for loop in ("1", "0"):
                monkeypatch.setenv("MERGESEARCH_KERNEL", loop)
                results.append(_ours("task_arithmetic", xs, params, Context(cache=StatCache()), [None] * 3))
            assert torch.equal(_bits(results[0]), _bits(results[1]))
    assert built and all(built)


@pytest.mark.parametrize("models", [1, 2, 4, 5])
def test_float32_sums_over_the_models_add_as_torchs(models, monkeypatch, one_torch_thread):
    """torch's float32 sum over the models adds them one by one from 0 up to four of them (its outer
    sum keeps four partial sums): the loop builds those, the torch ops the rest. Deltas over 16
    binades (their order of additions shows in the last bits), pieces of every ragged length."""
    built = []
    run = family_kernel.FamilyCall.run
    monkeypatch.setattr(family_kernel.FamilyCall, "run", lambda self, s, e: built.append(run(self, s, e)) or built[-1])
    g = torch.Generator().manual_seed(models)
    for n in (1, 7, 31, 33, 100, 1001, 65_537):
        base = torch.randn(n, generator=g)
        xs = [base] + [base + torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 8, (n,), generator=g) for _ in range(models)]
        for method, params in (("task_arithmetic", {"weight": [0.3 + k for k in range(models)]}),
                               ("ties", {"weight": [1.0] * models, "density": [0.6] * models})):
            results = []
            for loop in ("1", "0"):
                monkeypatch.setenv("MERGESEARCH_KERNEL", loop)
                results.append(_ours(method, xs, params, Context(cache=StatCache()), [None] * (models + 1)))
            assert torch.equal(results[0].view(torch.int32), results[1].view(torch.int32)), (n, method)
    assert (len(built) > 0) == (models <= family_kernel.F32_MODELS)
