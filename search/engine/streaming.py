"""Streamed sources: the host tensors of each merge job copied to the device one job ahead.

When the sources do not fit on the GPU (search/engine/memory_plan.py) they stay
memory-mapped on the host. Each job (one output tensor) reads a few source tensors:
they are copied into one of two staging slots while the job before computes. On CUDA
the host copy goes mapped file -> pinned buffer (host memcpy), then pinned -> device
on a side stream, so the transfer of job k+1 overlaps the kernels of job k; the
compute stream waits on the copy's event, and a slot is refilled only after the
compute that read it (its `released` event). Elsewhere (the CPU, in tests) the same
slots are filled with plain copies, so the ring's logic runs without a GPU.

Staged tensors are reused two jobs later: a result that is a staged input must be
copied out (the Materializer treats them as transient).
"""

from __future__ import annotations

import torch

_ALIGN = 256  # bytes: every staged tensor starts aligned for any dtype and vector load


class _Slot:
    def __init__(self, cuda: bool):
        self.device_buf: torch.Tensor | None = None
        self.host_buf: torch.Tensor | None = None  # pinned, CUDA only
        self.views: list[torch.Tensor | None] = []
        self.copied = torch.cuda.Event() if cuda else None  # the device copy of this slot is done
        self.released = torch.cuda.Event() if cuda else None  # the compute that read this slot is done


def _layout(tensors: list[torch.Tensor | None]) -> tuple[list[int], int]:
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        if t is not None:
            at += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, at


def _view(buf: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return buf[offset : offset + nbytes].view(like.dtype).view(like.shape)


class SourceStream:
    """Two staging slots on `device`; `stage` fills the next one, `ready` hands its tensors to the compute
    stream, `release` marks it free once the work queued so far is done."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = [_Slot(self.cuda), _Slot(self.cuda)]
        self.turn = 0

    def reserve(self, nbytes: int) -> None:
        """Grow both slots to `nbytes` now (between candidates), so no slot grows mid-stage."""
        for slot in self.slots:
            if slot.device_buf is None or slot.device_buf.numel() < nbytes:
                if self.cuda:
                    torch.cuda.synchronize(self.device)  # nothing may still read or fill the old buffers
                    slot.host_buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                slot.device_buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def stage(self, tensors: list[torch.Tensor | None]) -> _Slot:
        """Start copying `tensors` (host; None = not streamed) into the next slot."""
        slot = self.slots[self.turn]
        self.turn ^= 1
        offsets, need = _layout(tensors)
        self.reserve(need)
        slot.views = [None if t is None else _view(slot.device_buf, o, t) for t, o in zip(tensors, offsets)]
        if not self.cuda:
            for t, v in zip(tensors, slot.views):
                if t is not None:
                    v.copy_(t)
            return slot
        slot.copied.synchronize()  # the pinned buffer's previous copy to the device is done (host waits)
        for t, o in zip(tensors, offsets):
            if t is not None:
                _view(slot.host_buf, o, t).copy_(t)  # mapped pages -> pinned memory: the host's share
        with torch.cuda.stream(self.side):
            self.side.wait_event(slot.released)  # the job two back has finished reading this slot
            for t, o, v in zip(tensors, offsets, slot.views):
                if t is not None:
                    v.copy_(_view(slot.host_buf, o, t), non_blocking=True)
            slot.copied.record(self.side)
        return slot

    def ready(self, slot: _Slot) -> list[torch.Tensor | None]:
        """The slot's tensors, safe to read on the current stream."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.copied)
        return slot.views

    def release(self, slot: _Slot) -> None:
        """The work that reads the slot is queued: the slot may be refilled once it has run."""
        if self.cuda:
            slot.released.record(torch.cuda.current_stream(self.device))
        slot.views = []


class StreamedJobs:
    """The streamed inputs of a list of jobs, each staged one job ahead of its use."""

    def __init__(self, stream: SourceStream, host_inputs: list[list[torch.Tensor | None]]):
        self.stream = stream
        self.host_inputs = host_inputs
        self.slots: dict[int, _Slot] = {}
        stream.reserve(max((_layout(ts)[1] for ts in host_inputs), default=0))

    def take(self, k: int) -> list[torch.Tensor | None]:
        """Job k's inputs on the device (None where not streamed); job k+1's copy starts now."""
        if k not in self.slots:
            self.slots[k] = self.stream.stage(self.host_inputs[k])
        if k + 1 < len(self.host_inputs):
            self.slots[k + 1] = self.stream.stage(self.host_inputs[k + 1])
        return self.stream.ready(self.slots[k])

    def done(self, k: int) -> None:
        self.stream.release(self.slots.pop(k))

    def close(self) -> None:
        """Release what a failed pass left staged, so the next candidate refills those slots only after it."""
        for k in list(self.slots):
            self.done(k)
