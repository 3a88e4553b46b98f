"""The numba kernel behind `kernels.fold_half`: importing this module imports numba.

One compiled signature serves float16 and bfloat16 and 1 to 4 updates per pass: every choice is a
loop-invariant select (an unused slot repeats update 0 and its result is discarded), which LLVM
vectorises, so the loop stays one vector loop instead of a branch per element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _bf16(typingctx: Any, bits: Any) -> Any:
    """A bfloat16's bits (int16) as the float32 it is: the bits in the upper half of a word."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        word = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(word, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f16(typingctx: Any, bits: Any) -> Any:
    """A float16's bits (int16) as the float32 it is (exact; F16C's conversion where the CPU has it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """``a * b + c`` rounded once (LLVM's fma: the FMA instruction where the CPU has it)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _widen(bits: Any, half: bool) -> Any:
    # An intrinsic's typing context is numba's to pass: mypy sees one argument missing.
    return _f16(bits) if half else _bf16(bits)  # type: ignore[call-arg]


@njit(inline="always")
def _lerp(a: Any, x: Any, coeff: Any, small: bool) -> Any:
    """torch's vectorised lerp: ``fma(w, x - a, a)`` if ``w < 0.5`` else ``fma(w - 1, x - a, x)``."""
    return _fma(coeff, x - a, a if small else x)  # type: ignore[call-arg]


def _fold(acc: Any, x0: Any, x1: Any, x2: Any, x3: Any, weights: Any, first: bool, half: bool) -> None:
    """Fold ``len(weights)`` (1 to 4) of `x0`..`x3` into `acc` in order; `first`: `x0` replaces acc."""
    k = weights.shape[0]
    coeffs = np.zeros(4, np.float32)
    smalls = np.zeros(4, np.bool_)
    for j in range(k):
        smalls[j] = weights[j] < np.float32(0.5)
        coeffs[j] = weights[j] if smalls[j] else weights[j] - np.float32(1.0)
    c0, c1, c2, c3 = coeffs[0], coeffs[1], coeffs[2], coeffs[3]
    s0, s1, s2, s3 = smalls[0], smalls[1], smalls[2], smalls[3]
    on1, on2, on3 = k > 1, k > 2, k > 3
    for i in range(acc.shape[0]):
        x = _widen(x0[i], half)
        a = x if first else _lerp(acc[i], x, c0, s0)
        x = _widen(x1[i], half)
        a = _lerp(a, x, c1, s1) if on1 else a
        x = _widen(x2[i], half)
        a = _lerp(a, x, c2, s2) if on2 else a
        x = _widen(x3[i], half)
        a = _lerp(a, x, c3, s3) if on3 else a
        acc[i] = a


_BITS = types.Array(types.int16, 1, "C")
_SIGNATURE = types.void(
    types.Array(types.float32, 1, "C"), _BITS, _BITS, _BITS, _BITS, types.Array(types.float32, 1, "C"),
    types.boolean, types.boolean,
)  # fmt: skip


def compiled() -> Any:
    """The kernel, compiled for its one signature or read back from numba's on-disk cache.

    The cache lives in ``__pycache__`` beside this file, else in numba's user-wide cache folder
    (``NUMBA_CACHE_DIR``); with neither writable the kernel is compiled in memory each process.
    """
    try:
        kernel = njit(nogil=True, boundscheck=False, cache=True)(_fold)
    except RuntimeError:  # pragma: no cover - numba found no writable cache folder
        kernel = njit(nogil=True, boundscheck=False)(_fold)
    kernel.compile(_SIGNATURE.args)
    kernel.disable_compile()  # another signature would be a bug, not a reason to compile again
    return kernel
