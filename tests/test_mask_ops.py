"""search/engine/methods/mask_ops.py: each fast op against the torch op it stands for, bit for bit.

The family's pass (task_arithmetic.py) replaces mergekit's bool masks and sums over models with ops
on torch's fast paths. Each replacement is checked here on adversarial values — zeros of both signs,
infinities, subnormals, NaN of assorted signs and payloads, lengths with a ragged vector tail — and
the whole family against mergekit in tests/test_density_pieces.py.
"""

from __future__ import annotations

import pytest
import torch

from search.engine.methods import mask_ops

FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def _adversarial(shape: tuple[int, ...], dtype: torch.dtype, seed: int, nan: bool = True) -> torch.Tensor:
    """Random bit patterns (every exponent, NaN payloads), zeros of both signs, infinities, subnormals
    and ordinary values, mixed."""
    g = torch.Generator().manual_seed(seed)
    ints = mask_ops.flag_dtype(dtype)
    raw = torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64)
    x = raw.to(ints).view(dtype).clone() if ints != torch.int64 else (raw * 4294967311).view(dtype).clone()
    pick = torch.rand(shape, generator=g)
    x[pick < 0.1] = 0.0
    x[(pick >= 0.1) & (pick < 0.2)] = -0.0
    x[(pick >= 0.2) & (pick < 0.23)] = float("inf")
    x[(pick >= 0.23) & (pick < 0.26)] = -float("inf")
    x[(pick >= 0.26) & (pick < 0.3)] = torch.finfo(dtype).tiny / 4  # subnormal
    ordinary = (pick >= 0.3) & (pick < (0.9 if nan else 1.01))
    x[ordinary] = (torch.randn(shape, generator=g) * 0.02).to(dtype)[ordinary]
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(mask_ops.flag_dtype(t.dtype))


def _scratch():
    buffers: dict = {}

    def scratch(slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if (slot, dtype) not in buffers or buffers[slot, dtype].numel() < numel:
            buffers[slot, dtype] = torch.empty(numel, dtype=dtype)
        return buffers[slot, dtype][:numel]

    return scratch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_sum_over_models_is_torchs_to_the_bit(dtype):
    """0 + x_0 + x_1 + ... in float32, rounded once, for every model count it is used for; a NaN's bits
    (left to torch's own sum) included."""
    scratch = _scratch()
    for m in range(1, mask_ops.MAX_ROWS + 1):
        for c in (70_001, 33):
            rows = _adversarial((m, c), dtype, seed=m * 1000 + c, nan=m % 2 == 0)
            want = torch.sum(rows, dim=0)
            got = mask_ops.sum_models(rows, torch.empty(c, dtype=dtype), scratch)
            assert torch.equal(_bits(got), _bits(want)), (m, c)
            # rows given as their float32 values: the same bits but for a NaN's payload, which torch's
            # own 16-bit conversions do not keep alike (a vector loop and its scalar tail differ)
            from_float = mask_ops.sum_models(rows.float(), torch.empty(c, dtype=dtype), scratch)
            assert torch.equal(from_float.isnan(), want.isnan()), (m, c, "float32 rows")
            numbers = ~want.isnan()
            assert torch.equal(_bits(from_float)[numbers], _bits(want)[numbers]), (m, c, "float32 rows")


@pytest.mark.parametrize("dtype", FLOATS)
def test_a_product_by_the_mask_is_the_product_by_the_bool(dtype):
    x = _adversarial((70_001,), dtype, seed=1)
    keep = torch.rand(70_001, generator=torch.Generator().manual_seed(2)) < 0.4
    flags = torch.empty(70_001, dtype=mask_ops.flag_dtype(dtype))
    mask = mask_ops.as_mask(torch.lt(torch.rand(70_001, generator=torch.Generator().manual_seed(2)), 0.4, out=flags), dtype)
    assert torch.equal(_bits(x * mask), _bits(x * keep))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_python_float_factor_is_the_product_by_the_0_dim_tensor(dtype):
    """DARE's rescale factor multiplies as a Python float (torch's fast scalar path): every 16-bit value
    (a sample of float32's) times factors of all sizes, NaN included, the same bits."""
    if dtype == torch.float32:
        x = _adversarial((70_001,), dtype, seed=3)
    else:
        x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    for factor in (0.3, -0.7, 1.5, 3.1e-3, 7.1, 1e4, -2.5e-5, 6.0e4, float("nan"), float("inf")):
        f = torch.tensor(factor, dtype=dtype)
        assert torch.equal(_bits(x * f), _bits(x * float(f))), factor


def _mergekit_consensus(deltas: torch.Tensor, weights: torch.Tensor, int8_mask: bool):
    """mergekit 0.1.5's get_mask(method="sum") and the two sums of generalized_task_arithmetic."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    mask = get_mask(deltas, method="sum", mask_dtype=torch.int8 if int8_mask else deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, divisor


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_sign_consensus_is_mergekits(dtype, m):
    for int8_mask in (False, True):
        c = 70_001
        deltas = _adversarial((m, c), dtype, seed=10 * m, nan=False)
        deltas[:, :5000] = deltas[:, :5000].abs()  # agreeing columns
        deltas[0, 5000:6000] = -deltas[0, 5000:6000].abs()
        weights = torch.tensor([[0.6], [0.4], [-0.3], [1.0], [0.25]][:m], dtype=dtype)
        weights[0] = 0.0 if m == 3 else weights[0]  # a zero weight: a divisor of 0 where only it agrees
        weighted = deltas * weights
        want_mixed, want_divisor = _mergekit_consensus(weighted, weights, int8_mask)
        mixed, divisor = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
        got = mask_ops.sign_consensus(weighted, weights.to(mask_ops.acc_dtype(dtype)), mixed, divisor, _scratch())
        assert got is divisor
        assert torch.equal(_bits(mixed), _bits(want_mixed)), (dtype, m, "mixed")
        assert torch.equal(_bits(divisor), _bits(want_divisor)), (dtype, m, "divisor")
