"""Elementwise passes fused into one loop: out = a * ca + b * cb, in float32, rounded once.

mergekit computes slerp's (and a two-model linear's) output as separate torch ops,
each rounding to float32, and one final cast to the stored dtype. The same ops
in eager torch read and write float32 temporaries several times; fused, the pass
reads the two inputs and writes the output once, at about the speed of a copy.

The fused kernel is torch.compile (Inductor) on the CPU. Inductor compiles C++
with -ffp-contract=off, so a * ca + b * cb is two roundings-to-float32 products
and a rounded sum, as in eager torch: the results are the same bits (tested in
tests/test_methods_vs_mergekit.py::test_fused_pass_is_bit_exact). Compiling
takes seconds once per process (then Inductor's on-disk cache), so only tensors
of FUSE_MIN_NUMEL elements or more use it; set MERGESEARCH_COMPILE=0 to never
compile. Without a working compiler, or on other devices, the pass runs as
eager torch ops over cache-sized pieces.
"""

from __future__ import annotations

import logging
import os

import torch

from search.engine.methods.base import Context, piece_size, pieces

FUSE_MIN_NUMEL = 1 << 20
LOG = logging.getLogger(__name__)

_compiled = None
_compile_failed = False


def _weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(a.to(ca.dtype) * ca + b.to(ca.dtype) * cb)


def _fused():
    global _compiled, _compile_failed
    if _compiled is None and not _compile_failed:
        try:
            _compiled = torch.compile(_weighted_sum, dynamic=True, fullgraph=True)
        except Exception as e:  # no compiler, unsupported platform
            LOG.warning("torch.compile unavailable (%s); merging with eager torch ops", e)
            _compile_failed = True
    return _compiled


def use_fused(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.numel() >= FUSE_MIN_NUMEL
        and os.environ.get("MERGESEARCH_COMPILE", "1") != "0"
        and not _compile_failed
    )


def weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor, ctx: Context) -> None:
    """out = a * ca + b * cb: both products and the sum rounded to ca's float dtype, then to out's.
    ca, cb: one-element tensors of the working float dtype."""
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.view(-1)
    ca, cb = ca.reshape(1), cb.reshape(1)
    if use_fused(fo):
        kernel = _fused()
        if kernel is not None:
            try:
                kernel(fa, fb, ca, cb, fo)
                return
            except Exception as e:
                global _compile_failed
                _compile_failed = True
                LOG.warning("compiled merge pass failed (%s); merging with eager torch ops", e)
    eager_weighted_sum(fa, fb, ca, cb, fo, ctx)


def eager_weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor, ctx: Context) -> None:
    """The same pass as eager ops over pieces that stay in cache (all vectorized, same-dtype ops)."""
    dtype = ca.dtype
    xa, xb = float(ca), float(cb)  # exact: a float32/64 value as a Python float
    for start, end in pieces(out.numel(), piece_size(out)):
        pa = ctx.scratch(1, end - start, dtype, a.device)
        pb = ctx.scratch(2, end - start, dtype, a.device)
        pa.copy_(a[start:end])
        pa.mul_(xa)
        pb.copy_(b[start:end])
        pb.mul_(xb)
        pa.add_(pb)
        out[start:end].copy_(pa)
