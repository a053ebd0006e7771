"""Elementwise passes fused into one loop: out = a * ca + b * cb, in float32, rounded once.

mergekit computes slerp's (and a two-model linear's) output as separate torch ops,
each rounding to float32, and one final cast to the stored dtype. The same ops
in eager torch read and write float32 temporaries several times; fused, the pass
reads the two inputs and writes the output once, at about the speed of a copy.

The fused kernel is torch.compile (Inductor) on the CPU. Inductor compiles C++
with -ffp-contract=off, so a * ca + b * cb is two roundings-to-float32 products
and a rounded sum, as in eager torch: the results are the same bits (tested in
tests/test_methods_vs_mergekit.py::test_fused_pass_is_bit_exact). Only tensors
of FUSE_MIN_NUMEL elements or more use it, and only where compiling pays back:
compiling costs seconds once per process (~3-5 s on a quiet 2-core machine with
Inductor's on-disk cache warm, several times that cold; the cache is Inductor's
own, torchinductor_<user> in the system's temporary folder or
$TORCHINDUCTOR_CACHE_DIR, kept across runs),
and the fused pass saves about half a nanosecond per element over the eager
pieces. So by default (MERGESEARCH_COMPILE unset) a process merges eagerly until
it has passed PAYBACK_NUMEL elements through them, the work over which compiling
first would have paid back, and compiles then: never more than about twice the
cost of the better choice in hindsight, and no compile for small models, short
runs or a worker's first trial. MERGESEARCH_COMPILE=1 compiles at once,
MERGESEARCH_COMPILE=0 never. Without a working compiler the pass runs as eager
torch ops over cache-sized pieces.

On a GPU nothing is compiled by Inductor (whose Triton code may contract a * ca + b
into one fma, a different rounding). The pass is a hand-written Triton kernel built
with fp fusion off (search/engine/methods/fused_triton.py), checked bit for bit
against the eager ops once per device and dtypes before it is used; otherwise, or
without Triton, three eager kernels over large pieces (mul, mul, add: mergekit's own
ops, rounded as they round). No value comes back to the host either way.
"""

from __future__ import annotations

import logging
import os

import torch

from search.engine.methods import fused_triton
from search.engine.methods.base import Context, piece_size, pieces
from search.engine.methods.lanes import run_pieces

FUSE_MIN_NUMEL = 1 << 20
# elements merged eagerly before compiling pays back: ~4 s of compiling / ~0.5 ns saved per element
PAYBACK_NUMEL = 8_000_000_000
LOG = logging.getLogger(__name__)

_compiled = None
_compile_failed = False
_eager_numel = 0  # elements of FUSE_MIN_NUMEL-sized tensors merged eagerly in this process


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
    setting = os.environ.get("MERGESEARCH_COMPILE")
    if t.device.type != "cpu" or t.numel() < FUSE_MIN_NUMEL or setting == "0" or _compile_failed:
        return False
    return setting == "1" or _eager_numel >= PAYBACK_NUMEL


def weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor, ctx: Context) -> None:
    """out = a * ca + b * cb: both products and the sum rounded to ca's float dtype, then to out's.
    ca, cb: one-element tensors of the working float dtype."""
    fa, fb, fo = a.reshape(-1), b.reshape(-1), out.view(-1)
    ca, cb = ca.reshape(1), cb.reshape(1)
    if fo.device.type != "cpu":
        device_weighted_sum(fa, fb, ca, cb, fo, ctx)
        return
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
    if fo.numel() >= FUSE_MIN_NUMEL:
        global _eager_numel
        _eager_numel += fo.numel()
    eager_weighted_sum(fa, fb, ca, cb, fo, ctx)


def eager_weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor, ctx: Context) -> None:
    """The same pass as eager ops over pieces that stay in cache (all vectorized, same-dtype ops),
    spread over the CPU's lanes (search/engine/methods/lanes.py)."""
    dtype = ca.dtype
    xa, xb = float(ca), float(cb)  # exact: a float32/64 value as a Python float

    def combine(start: int, end: int, lane: int) -> None:
        pa = ctx.scratch((1, lane), end - start, dtype, a.device)
        pb = ctx.scratch((2, lane), end - start, dtype, a.device)
        pa.copy_(a[start:end])
        pa.mul_(xa)
        pb.copy_(b[start:end])
        pb.mul_(xb)
        pa.add_(pb)
        out[start:end].copy_(pa)

    run_pieces(out.numel(), piece_size(out), combine, out.device)


def device_weighted_sum(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor, out: torch.Tensor, ctx: Context) -> None:
    """The pass on an accelerator: the verified fused kernel, else mergekit's eager ops over large
    pieces; ca and cb stay on the device (no .item(), no host round trip)."""
    if fused_triton.weighted_sum(a, b, ca, cb, out):
        return
    dtype = ca.dtype
    for start, end in pieces(out.numel(), piece_size(out)):
        pa = ctx.scratch(1, end - start, dtype, a.device)
        pb = ctx.scratch(2, end - start, dtype, a.device)
        # mul converts a in the kernel (exact) and rounds the product to ca's dtype, as
        # a.to(float32) * ca does; add rounds the sum to float32, then to out's dtype on store.
        torch.mul(a[start:end], ca, out=pa)
        torch.mul(b[start:end], cb, out=pb)
        torch.add(pa, pb, out=out[start:end])
