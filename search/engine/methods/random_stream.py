"""DARE's random draws on the CPU, as mergekit 0.1.5 makes them, replayed faster and reused across candidates.

mergekit draws a task vector's mask with `torch.bernoulli(torch.full_like(delta, density))` from
torch's CPU generator, seeded by `--random-seed`. For a tensor of probabilities torch runs a serial
loop: element i takes the i-th 32-bit output r_i of the generator's mt19937 and keeps the element
when (r_i & 0xFFFFFF) * 2**-24 < p, p being the density rounded to the work dtype. So the mask is
a function of the stream position and p alone:

- numpy's MT19937 is the same algorithm: loaded with the torch generator's state it yields the
  same r_i, about twice as fast as torch's per-element loop (and without its float conversions);
- a worker re-seeds the stream for every candidate, so a tensor that starts at the same stream
  offset sees the same draws in every candidate: the draws are kept (StatCache) and a new density
  costs one comparison per element. Kept are the top 16 of the 24 bits (2 bytes an element):
  that decides `u < p` exactly whenever p * 2**24 is a multiple of 256, true of every bfloat16
  density of 2**-9 or more (bfloat16 has 8 significant bits); for other densities (float32's:
  float16's DARE on the CPU draws in float32) all 24 bits are kept (int32, 4 bytes an element).

The stream's position is tracked as an offset (draws since seeding); the generator state at
each tensor's end is kept too (2.5 KiB), so a tensor whose draws were not kept starts from its
own offset without replaying the tensors before it.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from search.engine.methods.base import Context

_STATE_WORDS = 624  # mt19937
_PIECE = 1 << 20  # draws per numpy call (4 MiB of uint32): bounded temporaries
BITS = 24  # float32's digits: torch keeps the low 24 bits of each 32-bit draw
KEPT_SHIFT = 8  # kept draws: the top 16 of those 24 bits
KEPT_BIAS = 1 << 15  # stored as int16: top16 - 2**15


def torch_state(generator: torch.Generator) -> np.random.MT19937:
    """A numpy MT19937 at the same point of the stream as a CPU torch.Generator."""
    raw = bytes(generator.get_state().numpy())
    # CPUGeneratorImplState: int64 seed, int left, int seeded, uint64 next, uint64 state[624], ...
    _, left, _, _ = struct.unpack_from("<qiiQ", raw, 0)
    key = np.frombuffer(raw, dtype=np.uint64, count=_STATE_WORDS, offset=24).astype(np.uint32)
    bits = np.random.MT19937()
    # torch's `left` counts down to the next twist (1: twist first); numpy's `pos` counts up to 624.
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _STATE_WORDS + 1 - left}}
    return bits


class RandomStream:
    """The draws of one stage's generator, by offset since seeding (keys of the draw cache)."""

    def __init__(self, generator: torch.Generator):
        self.seed = generator.initial_seed()
        # Offsets count from seeding: a generator that has drawn already has no offset to key draws by.
        fresh = torch.Generator().manual_seed(self.seed).get_state()
        self.keyed = torch.equal(generator.get_state(), fresh)
        self.offset = 0
        self._bits = torch_state(generator)
        self._bits_at = 0  # the offset numpy's generator is at
        self._start = self._bits.state  # the state at offset 0

    def key(self, n: int):
        """The cache key of the next n draws (None when the stream is not keyed by offsets)."""
        return ("dare-draws", self.seed, self.offset, n) if self.keyed else None

    def skip(self, n: int) -> None:
        """Move past n draws served from the cache."""
        self.offset += n

    def uniform_bits(self, n: int, out: torch.Tensor, ctx: Context) -> torch.Tensor:
        """out[:n] (int32) = the low 24 bits of the next n draws; the stream moves past them. numpy writes
        them straight into out's memory, one thread (no torch op: on a shared machine torch's threads stall)."""
        self._seek(ctx)
        gen = np.random.Generator(self._bits)
        flat = out[:n]
        dest = flat.numpy().view(np.uint32)
        for start in range(0, n, _PIECE):
            end = min(n, start + _PIECE)
            # integers over the full uint32 range are the raw 32-bit outputs, one per draw
            raw = gen.integers(0, 1 << 32, size=end - start, dtype=np.uint32)
            np.bitwise_and(raw, (1 << BITS) - 1, out=dest[start:end])
        self.offset += n
        self._bits_at = self.offset
        if self.keyed:
            ctx.cache.get(("dare-stream-state", self.seed, self.offset), lambda: _State(self._bits.state))
        return flat

    def _seek(self, ctx: Context) -> None:
        """Bring numpy's generator to `self.offset`: it is there, or its state there was kept, or replay."""
        if self._bits_at == self.offset:
            return
        kept = ctx.cache.peek(("dare-stream-state", self.seed, self.offset)) if self.keyed else None
        if kept is not None:
            self._bits.state = kept.state
            self._bits_at = self.offset
            return
        if self._bits_at > self.offset:
            self._bits.state, self._bits_at = self._start, 0
        gap = self.offset - self._bits_at
        for start in range(0, gap, _PIECE):
            self._bits.random_raw(min(_PIECE, gap - start))
        self._bits_at = self.offset


class _State:
    """A numpy generator state as a cache entry (its size: the 624-word key)."""

    nbytes = _STATE_WORDS * 4 + 64

    def __init__(self, state: dict):
        self.state = state


def threshold(p: float) -> int:
    """The draw bound of probability p: torch keeps u when u * 2**-24 < p, i.e. u < ceil(p * 2**24)."""
    return math.ceil(p * (1 << BITS))


def kept_bound(bound: int) -> int | None:
    """The bound on kept draws (top 16 bits, biased) equivalent to u < bound, or None if those bits cannot decide it."""
    if bound % (1 << KEPT_SHIFT):
        return None
    return (bound >> KEPT_SHIFT) - KEPT_BIAS


def keep_bits(u: torch.Tensor) -> torch.Tensor:
    """The kept form of 24-bit draws (int32): their top 16 bits as int16, biased (numpy, piece by piece)."""
    draws = u.numpy().view(np.uint32)
    kept = np.empty(draws.shape, dtype=np.int16)
    for start in range(0, draws.size, _PIECE):
        top = np.right_shift(draws[start : start + _PIECE], KEPT_SHIFT).astype(np.int32)
        np.subtract(top, KEPT_BIAS, out=kept[start : start + _PIECE], casting="unsafe")
    return torch.from_numpy(kept)
