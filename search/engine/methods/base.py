"""What a merge method is, and what it gets handed for one output tensor.

A method maps the input tensors of one output tensor (already in the work dtype,
in mergekit's model order) and its resolved parameters to the merged tensor. Its
math mirrors mergekit 0.1.5's op for op, because exactness to the bit depends on
the order of floating-point roundings, not only on the formula.

For speed a method may
- return one of its inputs unchanged when mergekit would store the same bytes
  (the caller then aliases it instead of copying),
- write into `ctx.out`, a preallocated buffer, instead of allocating,
- keep statistics that depend only on the inputs (norms, ranks, draws) in
  `ctx.cache`, keyed by `Inputs.keys`, across candidates.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Literal

import torch

from search.engine.parameters import ParamSpec

BasePolicy = Literal["required", "optional", "ignored"]

# Elementwise passes run over pieces of this many elements, so that fp32 scratch
# (1 MiB a buffer) stays in cache. A multiple of every SIMD width: a piece ends
# where torch's vector loop would, so no element takes a different code path.
CHUNK = 1 << 18
# On accelerators a piece is one kernel launch per op: large pieces (a 7B model's tensors are
# at most 131M elements: two pieces), so launches cost nothing beside the memory traffic,
# while float32 scratch stays bounded (256 MiB a buffer).
DEVICE_PIECE = 1 << 26


@dataclass
class Inputs:
    """The inputs of one output tensor."""

    name: str  # output tensor name
    tensors: list[torch.Tensor]  # in mergekit's model order, in the work dtype
    keys: list[Hashable | None]  # stable identity of each tensor for caching; None = do not cache
    base_index: int | None  # which tensor is the base model's

    @property
    def base(self) -> torch.Tensor:
        return self.tensors[self.base_index]

    def pair_key(self, *parts) -> Hashable | None:
        if any(k is None for k in self.keys):
            return None
        return (tuple(self.keys), self.base_index, *parts)


class StatCache:
    """Per-input statistics kept across candidates (slerp's norms, TIES's ranks, DARE's draws), within max_bytes.

    A worker sizes max_bytes from the memory its plan leaves (search/engine/memory_plan.py). The
    candidates of a search touch the same entries in the same order, every candidate: under least
    recently used eviction a cache one entry too small would drop each entry just before it is needed
    again and keep nothing. So an entry used by this candidate or the one before is never dropped for
    a new one: what does not fit is computed again each time, while what fits stays. Entries unused
    for two candidates (an earlier recipe's) make room, least recently used first."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.candidate = 0  # counts the candidates built (new_candidate)
        self._items: OrderedDict[Hashable, tuple[Any, int, int]] = OrderedDict()  # value, bytes, last candidate

    def new_candidate(self) -> None:
        self.candidate += 1

    def get(self, key: Hashable | None, make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        found = self.peek(key)
        if found is not None:
            return found
        return self.put(key, make())

    def peek(self, key: Hashable | None) -> Any:
        """The kept value of key, or None."""
        if key is None or key not in self._items:
            return None
        value, size, _ = self._items[key]
        self._items[key] = (value, size, self.candidate)
        self._items.move_to_end(key)
        return value

    def room_for(self, size: int) -> bool:
        """Whether an entry of `size` bytes would be kept now."""
        return self.bytes + size <= self.max_bytes or self._evictable() >= self.bytes + size - self.max_bytes

    def put(self, key: Hashable | None, value: Any) -> Any:
        """Keep value under key if there is room (see the class); return value either way."""
        size = _nbytes(value)
        if key is None or not self.room_for(size):
            return value
        for old in list(self._items):
            if self.bytes + size <= self.max_bytes:
                break
            if self._items[old][2] < self.candidate - 1:
                self.bytes -= self._items.pop(old)[1]
        self._items[key] = (value, size, self.candidate)
        self.bytes += size
        return value

    def _evictable(self) -> int:
        return sum(size for _, size, last in self._items.values() if last < self.candidate - 1)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return getattr(value, "nbytes", 64)


@dataclass
class Context:
    cache: StatCache = field(default_factory=StatCache)
    generator: torch.Generator | None = None  # the random stream of randomized methods
    out: torch.Tensor | None = None  # write the result here when given (shape and dtype of the result)
    buffers: dict = field(default_factory=dict)  # scratch, reused across passes and candidates
    draws: Any = None  # DARE's replay of `generator` (random_stream.RandomStream), made on first use
    # elements a pass may sort at once (TIES's ranks: 12 bytes each); None: a sort per lane. A one-shot
    # build bounds it so as to peak below mergekit (materialize.py's _sort_bound).
    sort_bound: int | None = None

    def scratch(self, slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable 1-d buffer of at least `numel` elements (grown, never shrunk)."""
        key = (slot, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, CHUNK), dtype=dtype, device=device)
            self.buffers[key] = buf
        return buf[:numel]

    def output_like(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or t.dtype
        if self.out is not None and self.out.shape == t.shape and self.out.dtype == dtype:
            return self.out
        return torch.empty(t.shape, dtype=dtype, device=t.device)


def pieces(n: int, chunk: int = CHUNK):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def piece_size(t: torch.Tensor) -> int:
    """Cache-sized pieces on the CPU; large ones on accelerators (where launches cost more than caches save)."""
    return CHUNK if t.device.type == "cpu" else DEVICE_PIECE


@dataclass(frozen=True)
class Method:
    """A merge method: its name, parameters, input contract and kernel."""

    name: str
    params: tuple[ParamSpec, ...]
    merge: Callable[[Inputs, dict, list[dict], Context], torch.Tensor]
    base: BasePolicy = "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    # An optional tensor (a tied head) present in only one input: take that one as is.
    passthrough_singleton: bool = False
    randomized: bool = False  # draws random numbers: tensors must run in mergekit's order
    native: bool = True

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def param(self, name: str) -> ParamSpec:
        return next(p for p in self.params if p.name == name)


def is_exact_copy_safe(t: torch.Tensor) -> bool:
    """x + (+-0) == x and x * 1 == x to the byte: true unless x holds NaN/inf or -0."""
    if not t.is_floating_point():
        return False
    return bool(torch.isfinite(t).all()) and not bool(((t == 0) & torch.signbit(t)).any())


def copy_safe(ctx: Context, key: Hashable | None, t: torch.Tensor) -> bool:
    """Cached is_exact_copy_safe."""
    return ctx.cache.get(None if key is None else ("copy-safe", key), lambda: is_exact_copy_safe(t))


def finite(ctx: Context, key: Hashable | None, t: torch.Tensor) -> bool:
    """Cached: no NaN or inf in t (0 * t is then +-0 everywhere)."""
    return ctx.cache.get(None if key is None else ("finite", key), lambda: bool(torch.isfinite(t).all()))
