"""slerp's combine pass as one Triton kernel on a GPU: out = a * ca + b * cb, read once, written once.

Eager torch needs three kernels and two float32 temporaries for it (22 bytes moved
per bf16 element instead of 6), which caps a candidate at about a quarter of the
device's copy bandwidth. One kernel reaches the copy's speed, but only if it rounds
as the eager ops do: each product to float32, the sum to float32, then to the
stored dtype (round to nearest even). Triton contracts a multiply feeding an add
into one fma (one rounding) unless the kernel is built with `enable_fp_fusion=False`,
so it is. And because a compiler is not a proof, the kernel is used on a device only
after it gave the eager ops' bits on a test vector (a million random elements over
33 decades of magnitude, with zeros, -0 and subnormals) for those dtypes; otherwise, or without
Triton, the caller runs the eager ops. `MERGESEARCH_TRITON=0` turns it off.
"""

from __future__ import annotations

import logging
import os

import torch

LOG = logging.getLogger(__name__)
BLOCK = 4096  # elements per program: 8 KiB of bf16 per input, enough loads in flight per SM

_kernel = None
_unavailable = False
_verified: dict[tuple, bool] = {}  # (device, a dtype, b dtype, coefficient dtype, out dtype) -> bits matched


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def weighted_sum_kernel(a_ptr, b_ptr, ca_ptr, cb_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        ca = tl.load(ca_ptr)
        cb = tl.load(cb_ptr)
        a = tl.load(a_ptr + offsets, mask=inside).to(ca.dtype)  # exact: a widening conversion
        b = tl.load(b_ptr + offsets, mask=inside).to(cb.dtype)
        result = a * ca + b * cb  # two rounded products, one rounded sum: fp fusion is off
        tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=inside)  # round to nearest even

    return weighted_sum_kernel


def _launch(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    _kernel[(triton_cdiv(n, BLOCK),)](a, b, ca, cb, out, n, BLOCK=BLOCK, enable_fp_fusion=False)


def triton_cdiv(n: int, d: int) -> int:
    return (n + d - 1) // d


def _eager(a, b, ca, cb, out) -> None:
    """The reference: mergekit's eager ops."""
    out.copy_(torch.mul(a, ca) + torch.mul(b, cb))


def _probe(device: torch.device, a_dtype, b_dtype, c_dtype, out_dtype) -> bool:
    """Whether the kernel gives the eager ops' bits on this device for these dtypes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n = (1 << 20) + 123  # not a multiple of BLOCK: the masked tail runs too
    x = torch.randn(2, n, generator=g, dtype=torch.float64) * torch.logspace(-30, 3, n, dtype=torch.float64)
    x[:, :64] = 0.0
    x[:, 64:128] = -0.0
    a, b = x[0].to(a_dtype).to(device), x[1].to(b_dtype).to(device)
    got, want = torch.empty(n, dtype=out_dtype, device=device), torch.empty(n, dtype=out_dtype, device=device)
    for ca_value, cb_value in ((0.3, 0.7), (0.8173, 0.2191), (1.0, 1.0), (-0.5, 1.5)):
        ca = torch.tensor([ca_value], dtype=c_dtype, device=device)
        cb = torch.tensor([cb_value], dtype=c_dtype, device=device)
        _launch(a, b, ca, cb, got)
        _eager(a, b, ca, cb, want)
        if not torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)):
            return False
    return True


def weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor) -> bool:
    """Run the fused pass if it is available and verified for this device and these dtypes;
    False (nothing written) when the caller must run the eager ops."""
    global _kernel, _unavailable
    if _unavailable or out.device.type != "cuda" or os.environ.get("MERGESEARCH_TRITON", "1") == "0":
        return False
    if not (a.is_contiguous() and b.is_contiguous() and out.is_contiguous()):
        return False
    key = (out.device, a.dtype, b.dtype, ca.dtype, out.dtype)
    try:
        if _kernel is None:
            _kernel = _build()
        if key not in _verified:
            _verified[key] = _probe(out.device, *key[1:])
            if not _verified[key]:
                LOG.warning("fused Triton pass differs from eager torch for %s; merging with eager ops there", key)
        if not _verified[key]:
            return False
        _launch(a, b, ca, cb, out)
        return True
    except Exception as e:  # no Triton, no compiler, an unsupported GPU: eager ops instead
        LOG.warning("fused Triton pass unavailable (%s: %s); merging with eager torch ops", type(e).__name__, e)
        _unavailable = True
        return False


def status() -> dict[str, bool]:
    """What was decided so far, for benchmarks: dtypes key -> the kernel is used."""
    return {"unavailable": _unavailable, **{str(k): v for k, v in _verified.items()}}
