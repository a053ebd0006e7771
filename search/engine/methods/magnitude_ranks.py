"""TIES's magnitude selection as mergekit 0.1.5 makes it, reusable across densities.

mergekit keeps the k = max(1, int(density * n)) elements of a task vector that come first in
`torch.argsort(|delta| as float32, descending=True)`. Which of several equal magnitudes come first
is the sort's own affair: the sort is not stable (x86-simd-sort on AVX2/AVX-512 CPUs, std::sort
elsewhere), and bfloat16 task vectors hold millions of equal magnitudes (exact zeros among them),
so no selection algorithm other than that very sort picks the same set.

What does not depend on density is the sort. Its inverse, each element's rank (int32, 4 bytes an
element), is computed once per task vector and kept (StatCache); a candidate's density is then
one comparison per element, rank < k, inside the merge's pass (search/engine/methods/task_arithmetic.py).
A rank computation holds the magnitudes (float32) and the sort's indices (int64): 12 bytes an
element, which search/engine/memory_estimate.py counts.
"""

from __future__ import annotations

import torch

from search.engine.methods.base import Context, pieces

def kept_count(density: float, n: int) -> int | None:
    """mergekit's k for a density: None when it keeps everything (density >= 1), 0 when nothing."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


def ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """rank[i] = position of element i in mergekit's descending sort of the task vector's magnitudes
    (|delta|, flattened; float32 on the CPU, as mergekit sorts them). Consumes `magnitudes`: on the CPU
    the sort runs in place (the same permutation as torch.argsort, tested) and the ranks take its memory."""
    n = magnitudes.numel()
    if magnitudes.device.type == "cpu" and magnitudes.dtype == torch.float32:
        order = torch.empty(n, dtype=torch.int64)
        torch.sort(magnitudes, descending=True, out=(magnitudes, order))
        rank = magnitudes.view(torch.int32)  # the sorted values are not needed: their bytes hold the ranks
    else:
        order = torch.argsort(magnitudes, descending=True)
        rank = torch.empty(n, dtype=torch.int32, device=order.device)
    for start, end in pieces(n, 1 << 22):  # the positions written piece by piece: no n-sized arange
        rank[order[start:end]] = torch.arange(start, end, dtype=torch.int32, device=order.device)
    return rank


def cached_ranks(magnitudes_of, key, ctx: Context) -> torch.Tensor:
    """The ranks of a task vector, kept or computed (magnitudes_of() gives its magnitudes)."""
    return ctx.cache.get(None if key is None else ("magnitude-ranks", key), lambda: ranks(magnitudes_of()))
