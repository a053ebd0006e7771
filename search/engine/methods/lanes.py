"""Piece loops on the CPU's cores: one Python thread per core ("lane"), each running torch with one thread.

A merge pass over cache-sized pieces issues many small ops. With torch's own threads every op is
split across the cores and ends at a barrier: on a machine whose cores other jobs also use, each
op waits for the slowest core's time slice, and a pass took 10-50x longer than on a quiet machine
(measured here: 2.5 ms instead of 15 us per 64K-element op at a load average of 3 on 2 cores).
Lanes take pieces from a shared counter instead, each with its own scratch buffers, so a lane that
gets less CPU simply does fewer pieces, and nothing waits on a barrier.

The results are the same bits: every op of a piece loop is elementwise or a sum over models at one
element, which no thread count changes. Sums over a whole tensor (slerp's norms, DARE's L1 norms),
whose last bits depend on how torch splits them among its threads, stay on the calling thread with
torch's own thread count, as mergekit runs them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
# A forked child has none of its parent's threads: it makes its own pools (a pool without threads would hang).
os.register_at_fork(after_in_child=_pools.clear)


def lane_count(device: torch.device | str = "cpu") -> int:
    """Lanes for a pass on `device`: torch's thread count on the CPU (the caller's, so that
    torch.set_num_threads and OMP_NUM_THREADS hold), one elsewhere and inside a lane."""
    if torch.device(device).type != "cpu" or getattr(_local, "in_lane", False):
        return 1
    return max(1, torch.get_num_threads())


_local = threading.local()


def _enter_lane() -> None:
    torch.set_num_threads(1)  # per thread: the caller keeps its own count
    _local.in_lane = True


def _pool(lanes: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if lanes not in _pools:
            _pools[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix="merge-lane", initializer=_enter_lane)
        return _pools[lanes]


def run_pieces(n: int, step: int, work: Callable[[int, int, int], None], device: torch.device | str = "cpu") -> None:
    """work(start, end, lane) for each piece [start, end) of n elements, `step` at a time; on the CPU
    spread over lanes (lane: 0..lanes-1, for per-lane scratch), elsewhere in order on this thread."""
    lanes = min(lane_count(device), -(-n // step)) if n else 1
    if lanes <= 1:
        for start in range(0, n, step):
            work(start, min(n, start + step), 0)
        return
    counter = iter(range(0, n, step))
    lock = threading.Lock()

    def lane(index: int) -> None:
        while True:
            with lock:
                start = next(counter, None)
            if start is None:
                return
            work(start, min(n, start + step), index)

    for future in [_pool(lanes).submit(lane, i) for i in range(lanes)]:
        future.result()


def map_in_lanes(fn: Callable[[T], R], items: Iterable[T], device: torch.device | str = "cpu", at_most: int | None = None) -> list[R]:
    """[fn(x) for x in items], the calls spread over lanes on the CPU (independent work, e.g. sorts),
    at most `at_most` of them at once."""
    items = list(items)
    lanes = min(lane_count(device), len(items), at_most or len(items))
    if lanes <= 1:
        return [fn(x) for x in items]
    return [f.result() for f in [_pool(lanes).submit(fn, x) for x in items]]
