"""Benchmark: could torch.compile fuse a TIES/DARE-TIES piece and keep mergekit's bits?

The family's pass (search/engine/methods/task_arithmetic.py) runs ~45 eager torch ops a piece; a
fused loop would read the inputs and write the output once. This bench compiles one piece of a
two-model DARE-TIES merge in bfloat16 — masks, rescale, weights, sign consensus, normalize, lambda,
every op's rounding to bfloat16 written out — with Inductor (CPU, C++), and compares it with
mergekit's own ops on the same piece (zeros of both signs, a NaN, an infinity, subnormals), bit
for bit, and with the eager ops in time; with Inductor's emulate_precision_casts off and on.

    .venv/bin/python bench/bench_fused_family.py [--elements 65536] [--repeats 50]

Not a test: compiling takes seconds and needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import time

import torch

BF16, F32 = torch.bfloat16, torch.float32


def piece(base, x0, x1, keep0, keep1, factors, weights, zero, lam):
    """The piece as float32 ops, each result rounded to bfloat16 where mergekit's op would round it."""
    def rounded(v):
        return v.to(BF16).to(F32)

    b = base.to(F32)
    d0 = rounded(x0.to(F32) - b) * keep0.to(F32)
    d1 = rounded(x1.to(F32) - b) * keep1.to(F32)
    d0 = rounded(rounded(d0 * factors[0]) * weights[0])
    d1 = rounded(rounded(d1 * factors[1]) * weights[1])
    summed = rounded((zero + d0) + d1)  # zero: a runtime 0 (a constant would be folded away)
    majority = torch.where(summed >= 0, 1.0, -1.0)
    a0 = ((d0 * majority) > 0).to(F32)
    a1 = ((d1 * majority) > 0).to(F32)
    mixed = rounded((zero + d0 * a0) + d1 * a1)
    divisor = rounded((zero + a0 * weights[0]) + a1 * weights[1])
    divisor = torch.where(divisor == 0, 1.0, divisor)
    mixed = rounded(rounded(mixed / divisor) * lam)
    return (b + mixed).to(BF16)


def mergekit_ops(base, x0, x1, keep0, keep1, factors, weights, lam):
    """mergekit 0.1.5's ops on the piece: bool masks, a rescale by a 0-dim tensor, get_mask's consensus."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    d0 = (x0 - base) * keep0 * factors[0].to(BF16)
    d1 = (x1 - base) * keep1 * factors[1].to(BF16)
    w = weights.to(BF16).unsqueeze(-1)
    weighted = torch.stack([d0, d1]) * w
    mask = get_mask(weighted, method="sum", mask_dtype=BF16)
    mixed = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (mixed / divisor) * float(lam)


def inputs(n: int):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(BF16)
    x0 = (base.float() + torch.randn(n, generator=g) * 0.002).to(BF16)
    x1 = (base.float() + torch.randn(n, generator=g) * 0.002).to(BF16)
    base[:100], x0[:100], x1[:50], x1[50:100] = -0.0, -0.0, -0.0, 0.0
    x0[200], x1[300] = float("nan"), float("inf")
    base[400:500] = torch.finfo(BF16).tiny / 4
    keep0, keep1 = torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.3
    factors, weights = torch.tensor([1.7, 3.1]).to(BF16).float(), torch.tensor([0.6, 0.4]).to(BF16).float()
    return base, x0, x1, keep0, keep1, factors, weights, torch.tensor(1.1)


def timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=65536, help="a piece's length (the CPU pass's FAMILY_PIECE)")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one lane's view
    import torch._inductor.config as inductor

    base, x0, x1, keep0, keep1, factors, weights, lam = inputs(args.elements)
    k0, k1, zero = keep0.to(torch.int16), keep1.to(torch.int16), torch.zeros(())
    want = mergekit_ops(base, x0, x1, keep0, keep1, factors, weights, lam).view(torch.int16)
    eager = piece(base, x0, x1, k0, k1, factors, weights, zero, lam)
    print(f"piece of {args.elements} elements, one thread")
    print("| kernel | compile s | us per piece | elements differing from mergekit's ops |")
    print("| --- | --- | --- | --- |")
    print(f"| eager ops (this piece function) | - | {timed(lambda: piece(base, x0, x1, k0, k1, factors, weights, zero, lam), args.repeats) * 1e6:.0f} | "
          f"{int((eager.view(torch.int16) != want).sum())} |")
    for emulate in (False, True):
        inductor.emulate_precision_casts = emulate
        torch._dynamo.reset()
        kernel = torch.compile(piece, dynamic=False, fullgraph=True)
        start = time.perf_counter()
        got = kernel(base, x0, x1, k0, k1, factors, weights, zero, lam)
        compile_s = time.perf_counter() - start
        t = timed(lambda: kernel(base, x0, x1, k0, k1, factors, weights, zero, lam), args.repeats)
        print(f"| Inductor, emulate_precision_casts={emulate} | {compile_s:.1f} | {t * 1e6:.0f} | {int((got.view(torch.int16) != want).sum())} |")


if __name__ == "__main__":
    main()
