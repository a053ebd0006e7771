"""The task-arithmetic family's masks and sums over models, on torch's fast paths, the same bits.

mergekit builds a piece of TIES or DARE with ops that, on the CPU, run on torch's slow paths:
comparisons into bool (`rank < k`, `sum >= 0`, `sign == majority`), products by a bool mask (a
mixed-dtype promotion) and, for 16-bit floats, sums over the models (`.sum(dim=0)`, an outer
reduction). Those took ~80% of a candidate's pass. The same values come from ops that run at
memory speed, checked against torch's own on adversarial values (zeros of both signs,
infinities, NaN, subnormals) in tests/test_mask_ops.py:

- a comparison written into an integer or float tensor instead of a bool one (1 and 0);
- a product by a bool mask is a product by 1 and 0 of the tensor's dtype (torch promotes the bool
  so): integer 1s and 0s times the bit pattern of 1.0, viewed as that dtype;
- on the CPU, a float16/bfloat16 sum over the models is, element by element, 0 + x_0 + x_1 + ...
  added in float32 in model order and rounded once (torch's accumulator), for up to MAX_ROWS models;
- TIES's sign test, sign(x) == majority, is x * majority > 0 (zero and NaN have sign 0), on the
  exact float32 copy of x; the sign of a zero product never matters, since every sum starts at +0.

Torch ops, not numpy's: numpy's are cheaper one by one, but each takes and gives back the GIL, and
two lanes then ran no faster than one (measured). On the CPU the C loop of family_kernel.py builds
most pieces; these ops build the rest (devices, NaN pieces, float32 over five or more models).
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import torch

HALF = (torch.bfloat16, torch.float16)
MAX_ROWS = 16  # models a 16-bit CPU sum is rebuilt for (tested up to here); above, torch's own sum
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# scratch(slot, numel, dtype) -> a reusable 1-d tensor of the calling lane
Scratch = Callable[[int, int, torch.dtype], torch.Tensor]
_ACC, _ROW, _F, _MAJORITY, _MASK, _PRODUCTS, _ZERO = range(7)


def flag_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer dtype of dtype's width: comparisons write 1s and 0s into it, as_mask turns them into dtype."""
    return _INTS[torch.finfo(dtype).bits // 8]


@cache
def one_bits(dtype: torch.dtype) -> int:
    """The bit pattern of 1.0 in dtype, as a (signed) integer of its width."""
    return int(torch.ones((), dtype=dtype).view(flag_dtype(dtype)))


def as_mask(flags: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """flags (1s and 0s of flag_dtype(dtype)) as the 1.0s and 0s of dtype, in place: what torch promotes
    a bool mask to in a product."""
    return flags.mul_(one_bits(dtype)).view(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch accumulates dtype's sums in."""
    return torch.float32 if dtype in HALF else dtype


def sum_models(rows: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """out = the sum over the models (rows [m, c]) that torch computes for a tensor of out's dtype
    holding rows' values, the same bits. rows: of out's dtype, or exactly their values in float32."""
    m, c = rows.shape
    if out.dtype in HALF and out.device.type == "cpu" and m <= MAX_ROWS:
        acc = scratch(_ACC, c, torch.float32)
        row = scratch(_ROW, c, torch.float32)
        for r in range(m):
            x = rows[r] if rows.dtype == torch.float32 else row.copy_(rows[r])
            if r == 0:
                torch.add(x, 0.0, out=acc)  # 0 + x: -0 becomes +0, as in torch's accumulator
            else:
                acc.add_(x)
        # A NaN's bits (sign, payload) depend on which operand an add returns and on the conversion's
        # code path: torch's own sum decides them (a piece with a NaN, or inf - inf, is rare).
        total = float(acc.sum())
        if total == total:
            return out.copy_(acc)
    return torch.sum(rows if rows.dtype == out.dtype else rows.to(out.dtype), dim=0, out=out)


def sign_consensus(deltas: torch.Tensor, weights: torch.Tensor, mixed: torch.Tensor, divisor: torch.Tensor,
                   scratch: Scratch) -> torch.Tensor:
    """TIES's consensus on one piece of weighted task vectors deltas [m, c], as mergekit 0.1.5's
    get_mask(method="sum") and its two sums compute it: mixed = the sum of the elements whose sign agrees
    with the sign of their sum, divisor = the sum of those elements' weights (0 -> 1). weights: [m, 1],
    rounded to deltas' dtype, held in acc_dtype. Returns divisor."""
    m, c = deltas.shape
    acc = acc_dtype(deltas.dtype)
    f = deltas if acc == deltas.dtype else scratch(_F, m * c, acc).view(m, c).copy_(deltas)
    # majority: +1 where the sum (rounded to dtype, as torch has it) is >= 0, else -1 (NaN too)
    majority = torch.ge(sum_models(f, mixed, scratch), 0, out=scratch(_MAJORITY, c, acc)).mul_(2).sub_(1)
    # mask = sign(x) == majority, i.e. x * majority > 0; then x * mask and w * mask
    mask = torch.mul(f, majority, out=scratch(_MASK, m * c, acc).view(m, c))
    torch.gt(mask, 0, out=mask)
    sum_models(torch.mul(f, mask, out=scratch(_PRODUCTS, m * c, acc).view(m, c)), mixed, scratch)  # x or +-0 (NaN for inf)
    sum_models(torch.mul(mask, weights, out=mask), divisor, scratch)
    # divisor[divisor == 0] = 1: +-0 + 1 is 1, and x + 0 is x for every other x (NaN too)
    return divisor.add_(torch.eq(divisor, 0, out=scratch(_ZERO, c, divisor.dtype)))
