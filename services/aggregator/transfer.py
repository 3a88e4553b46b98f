"""Moving decoded updates (CPU state dicts) to the aggregation device.

On the CPU there is nothing to move: `DeviceTransfer.to_device` returns the very same tensors.

On CUDA a host-to-device copy from ordinary (pageable) memory is synchronous and goes through a
driver bounce buffer at a fraction of the bus's speed. `DeviceTransfer` instead:

1. copies the update's bytes into a pinned (page-locked) host buffer that is allocated once and
   reused (grown when an update is larger), two of them used in turn;
2. enqueues ``non_blocking`` copies from that buffer on a side CUDA stream, so the host returns at
   once and the copy of update k + 1 runs while the kernels folding update k into the aggregate run
   on the compute (current) stream;
3. makes the current stream wait for the copy (an event, no host synchronisation) and records the
   new device tensors as used there (``record_stream``), so the caching allocator does not hand
   their memory out again while a kernel may still read them.

Before a pinned buffer is filled again, the host waits for the copy that last read from it (two
updates earlier), so host memory is never overwritten under an in-flight copy. Tensors already on
the target device pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

_ALIGN = 64
"""Byte alignment of each tensor inside the pinned buffer."""


class DeviceTransfer:
    """Moves state dicts to one device: a no-op on the CPU, pinned and overlapped copies on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0
        self._stream: torch.cuda.Stream | None = None
        if self._cuda:
            # torch.cuda.Stream and Event have untyped constructors.
            self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            self._buffers = [torch.empty(0, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._events = [None, None]

    def to_device(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` on the device, ready for use on the current stream; on the CPU the same tensors."""
        if not self._cuda:
            return dict(state)
        return self._to_cuda(state)

    def synchronize(self) -> None:
        """Wait until every copy enqueued so far has finished (e.g. before freeing host memory)."""
        for event in self._events:
            if event is not None:
                event.synchronize()

    # Internals --------------------------------------------------------------------------------

    def _to_cuda(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._stream is not None
        out: dict[str, torch.Tensor] = {}
        moving: list[tuple[str, torch.Tensor, int]] = []
        offset = 0
        for name, tensor in state.items():
            if tensor.device == self.device or tensor.numel() == 0:
                out[name] = tensor.to(self.device)
                continue
            moving.append((name, tensor, offset))
            offset += _aligned(tensor.numel() * tensor.element_size())
        if not moving:
            return out
        slot = self._next
        self._next = 1 - slot
        previous = self._events[slot]
        if previous is not None:
            previous.synchronize()
        if self._buffers[slot].numel() < offset:
            self._buffers[slot] = torch.empty(offset, dtype=torch.uint8, pin_memory=True)
        buffer = self._buffers[slot]
        current = torch.cuda.current_stream(self.device)
        staged: list[tuple[str, torch.Tensor]] = []
        for name, tensor, start in moving:
            nbytes = tensor.numel() * tensor.element_size()
            host = buffer[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor)
            staged.append((name, host))
        with torch.cuda.stream(self._stream):
            for name, host in staged:
                out[name] = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        self._events[slot] = event
        current.wait_event(event)
        for name, _ in staged:
            out[name].record_stream(current)
        return {name: out[name] for name in state}


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
