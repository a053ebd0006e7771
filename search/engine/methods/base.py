"""What a merge method is, and what it gets handed for one output tensor.

A method maps the input tensors of one output tensor (already in the work dtype,
in mergekit's model order) and its resolved parameters to the merged tensor. Its
math mirrors mergekit 0.1.5's op for op, because exactness to the bit depends on
the order of floating-point roundings, not only on the formula.

For speed a method may
- return one of its inputs unchanged when mergekit would store the same bytes
  (the caller then aliases it instead of copying),
- write into `ctx.out`, a preallocated buffer, instead of allocating,
- keep statistics that depend only on the inputs (norms, task vectors) in
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
    """Per-input statistics kept across candidates, least recently used dropped first."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable | None, make: Callable[[], Any]) -> Any:
        if key is None:
            return make()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value = make()
        size = _nbytes(value)
        if size <= self.max_bytes:
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped
        return value

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 64


@dataclass
class Context:
    cache: StatCache = field(default_factory=StatCache)
    generator: torch.Generator | None = None  # the random stream of randomized methods
    out: torch.Tensor | None = None  # write the result here when given (shape and dtype of the result)
    buffers: dict = field(default_factory=dict)  # scratch, reused across passes and candidates

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
