"""A fused convert-and-fold kernel: float16 and bfloat16 updates into float32 running means (CPU).

``fold_half(acc, steps, first=...)`` does what ``acc.copy_(first)`` then ``acc.lerp_(x.float(), f)``
per step do, in one pass over memory: each element of each update is widened to float32 in a
register (bfloat16: its bits shifted left by 16; float16: the hardware conversion) and folded into
the accumulator, up to `GROUP` updates per pass, so the accumulator is read and written once per
group and no float32 copy of an update is ever written. The kernel is compiled by numba (LLVM, no
C compiler needed) on first use and cached on disk (``cache=True``), so a process pays the compile
(about a second) once per installation, then about 0.1 s to load it, and only once it folds a
half-precision update: importing this module imports neither numba nor the kernel.

Bit for bit torch's lerp
------------------------
torch's CPU ``lerp_`` with a scalar weight ``w`` (cast to float32) computes, vectorised and in its
scalar tail alike, ``fma(w, end - self, self)`` when ``|w| < 0.5`` else
``fma(w - 1, end - self, end)``. The kernel computes the same with LLVM's ``fma`` intrinsic (one
rounding, as torch's), so its results equal the unfused torch path element for element, NaN and
infinities included (tests/aggregator/test_kernels.py): windowed and one-at-a-time folds agree
whichever path each fold takes.

Threads: a tensor of at least `PARALLEL_MIN` elements per thread is cut into chunks (four per
thread) that ``torch.get_num_threads()`` threads take in turn, folding at once (the kernel releases
the GIL); the threads are this module's own, so folds running at once in several threads of a
process are safe (numba's own parallel runtime is not used).

Where numba is not importable (or cannot compile), `fold_half` returns False and the caller folds
with torch as before.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import structlog
import torch

GROUP = 4
"""Updates folded per pass over the accumulator (the kernel's fixed arity): the aggregator's default
fold window. A longer window takes several passes, each over cache-sized blocks (`BLOCK`)."""
BLOCK = 1 << 18
"""Elements per block when a window takes several passes (1 MiB of accumulator: stays in L2)."""
PARALLEL_MIN = 1 << 17
"""Elements per thread below which a tensor is folded by the calling thread alone."""

_HALF = (torch.float16, torch.bfloat16)

log = structlog.get_logger(component="aggregator")

# (acc, x0, x1, x2, x3, weights, first, half) -> None
Kernel = Callable[..., None]


def fold_half(
    acc: torch.Tensor, steps: Sequence[tuple[torch.Tensor, float]], *, first: torch.Tensor | None = None
) -> bool:
    """``acc.copy_(first)`` if given, then ``acc.lerp_(x.float(), f)`` per step, fused; False if not done.

    `acc` must be a contiguous float32 CPU tensor and every value (`first`, each `x`) a float16 or
    bfloat16 CPU tensor of its number of elements, all of one dtype; weights in (0, 1]. Returns
    False, having touched nothing, when it cannot (no numba, or other dtypes or devices): the
    caller then folds with torch, which gives the same result.
    """
    values = [x for x, _ in steps] if first is None else [first, *(x for x, _ in steps)]
    if not values or not _fits(acc, values):
        return False
    kernel = load()
    if kernel is None:
        return False
    n = acc.numel()
    if n == 0:
        return True
    bits = [_bits(x) for x in values]
    weights = [1.0] * (first is not None) + [f for _, f in steps]
    half = values[0].dtype == torch.float16
    # Passes of up to GROUP values; torch casts a lerp's weight to float32 the same way.
    groups = [
        (bits[i : i + GROUP], np.array(weights[i : i + GROUP], np.float32), first is not None and i == 0)
        for i in range(0, len(bits), GROUP)
    ]
    out = acc.view(-1).numpy()

    def fold_range(lo: int, hi: int) -> None:
        step = hi - lo if len(groups) == 1 else BLOCK
        for start in range(lo, hi, step):
            end = min(start + step, hi)
            for xs, f, is_first in groups:
                padded = [x[start:end] for x in xs]
                padded += [padded[0]] * (GROUP - len(padded))
                kernel(out[start:end], *padded, f, is_first, half)

    threads = max(1, min(torch.get_num_threads(), n // PARALLEL_MIN))
    if threads == 1:
        fold_range(0, n)
        return True
    # Several chunks per thread (whole cache lines of 16 floats), taken in turn by whichever thread
    # is free: a thread another process holds off its core does not leave the others waiting.
    chunks = min(4 * threads, n // PARALLEL_MIN)
    bounds = [(n * i // chunks) // 16 * 16 for i in range(chunks)] + [n]
    queue = iter(range(chunks))  # next() on it is atomic under the GIL

    def drain() -> None:
        for i in queue:
            fold_range(bounds[i], bounds[i + 1])

    pool = _pool()
    futures: list[Future[None]] = [pool.submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for future in futures:
            future.result()
    return True


def _fits(acc: torch.Tensor, values: Sequence[torch.Tensor]) -> bool:
    dtype = values[0].dtype
    return (
        acc.dtype == torch.float32
        and acc.device.type == "cpu"
        and acc.is_contiguous()
        and not acc.is_neg()
        and dtype in _HALF
        and all(x.dtype == dtype and x.device.type == "cpu" and x.numel() == acc.numel() for x in values)
    )


def _bits(x: torch.Tensor) -> np.ndarray[Any, np.dtype[np.int16]]:
    """A flat int16 numpy view of a half-precision tensor's bits (a copy only if it is not contiguous)."""
    return x.resolve_neg().reshape(-1).view(torch.int16).numpy()


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="fedhub-fold")


_load_lock = threading.Lock()


@functools.cache
def load() -> Kernel | None:
    """The compiled kernel (compiled or read from numba's cache on the first call); None without numba."""
    with _load_lock:
        try:
            from services.aggregator.methods import _numba_kernel
        except ImportError:
            return None
        try:
            kernel: Kernel = _numba_kernel.compiled()
        except Exception as exc:  # the torch fold gives the same result: lose speed, not the round
            log.warning("fused fold kernel unavailable, folding with torch", error=repr(exc))
            return None
        return kernel
