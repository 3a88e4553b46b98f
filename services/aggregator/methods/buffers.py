"""CPU buffers kept from one round to the next, so that accumulators land in memory already mapped.

A round's accumulators are about one model (100 MB at 25M float32 parameters). Fresh, they are
pages the kernel maps and zeroes on first touch: here that is ~14 ms per 100 MB against ~8 ms
for the copy that touches them (`bench/aggregate.py`), a seventh of a 10-client round. An
aggregator computes round after round of the same model, so it keeps the buffers its last round
gave back and lends them to the next.

Ownership is explicit. A round takes a `BufferLease`; methods ask it for buffers with `empty`
(recycled contents: never read before written). Once the round's outcome is stored, the caller
gives the model's tensors back with `give_back`: only buffers this lease lent are taken (a view
that spans one of them, same dtype and size), anything else is ignored, so a tensor of the base
model or one a method allocated itself never enters the pool. `close` forgets whatever was not
given back (the garbage collector frees it as usual). The pool keeps at most `max_bytes`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence

import torch

_CPU = torch.device("cpu")


class BufferPool:
    """Flat CPU tensors given back by earlier rounds, by (dtype, number of elements), up to `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._free: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers waiting to be lent again."""
        return self._bytes

    def lease(self) -> BufferLease:
        """A lease for one round (see the module doc)."""
        return BufferLease(self)

    def _take(self, dtype: torch.dtype, numel: int) -> torch.Tensor | None:
        with self._lock:
            free = self._free.get((dtype, numel))
            if not free:
                return None
            flat = free.pop()
            self._bytes -= _nbytes(flat)
            return flat

    def _keep(self, flat: torch.Tensor) -> bool:
        size = _nbytes(flat)
        with self._lock:
            if self._bytes + size > self.max_bytes:
                return False
            self._free.setdefault((flat.dtype, flat.numel()), []).append(flat)
            self._bytes += size
            return True


class BufferLease:
    """One round's borrowings from a `BufferPool` (None pool: always fresh buffers, nothing kept)."""

    def __init__(self, pool: BufferPool | None = None) -> None:
        self._pool = pool
        self._lent: dict[int, torch.Tensor] = {}
        """Flat buffers handed out, by address: held here, so no other allocation can take the address."""

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of `shape` and `dtype` with undefined contents, recycled when possible."""
        numel = math.prod(shape)
        flat = self._pool._take(dtype, numel) if self._pool is not None else None
        if flat is None:
            flat = torch.empty(numel, dtype=dtype, device=_CPU)
        if self._pool is not None and numel:
            self._lent[flat.data_ptr()] = flat
        return flat.view(tuple(shape))

    def give_back(self, tensors: Iterable[torch.Tensor]) -> int:
        """Return the lent buffers among `tensors` to the pool; the caller must not use them again.

        Tensors this lease did not lend (or views of part of a buffer) are ignored. Returns how many
        buffers the pool kept.
        """
        kept = 0
        for tensor in tensors:
            flat = self._lent.get(tensor.data_ptr()) if tensor.device == _CPU else None
            if flat is None or tensor.dtype != flat.dtype or tensor.numel() != flat.numel():
                continue
            del self._lent[tensor.data_ptr()]
            if self._pool is not None and self._pool._keep(flat):
                kept += 1
        return kept

    def close(self) -> None:
        """Forget the buffers not given back."""
        self._lent.clear()


def _nbytes(flat: torch.Tensor) -> int:
    return flat.numel() * flat.element_size()
