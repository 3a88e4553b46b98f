"""Tensor records to and from numpy and torch, and the checks an update must pass.

numpy is enough to validate (the API never imports torch); torch is imported only by the functions
that build torch tensors, i.e. in the aggregator and the client SDK.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.codec import FLOAT_DTYPES, TensorRecord
from shared.errors import NonFiniteValues, TensorSpecMismatch

if TYPE_CHECKING:
    import torch

# An IEEE float is NaN or Inf exactly when all its exponent bits are set; checking that on an
# integer view works for every float width, bfloat16 included, without numpy knowing the type.
# The masks are numpy scalars of the view's type, made once: per check, numpy then converts nothing.
_EXPONENT_MASK: Mapping[str, tuple[type[np.unsignedinteger[Any]], np.unsignedinteger[Any]]] = {
    "float64": (np.uint64, np.uint64(0x7FF0_0000_0000_0000)),
    "float32": (np.uint32, np.uint32(0x7F80_0000)),
    "float16": (np.uint16, np.uint16(0x7C00)),
    "bfloat16": (np.uint16, np.uint16(0x7F80)),
}

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]
"""A model's signature: tensor name -> (dtype, shape)."""


def spec_of(records: Iterable[TensorRecord]) -> TensorSpec:
    """The signature of a set of tensors."""
    return {r.name: (r.dtype, r.shape) for r in records}


def first_non_finite(records: Iterable[TensorRecord]) -> str | None:
    """Name of the first floating tensor holding NaN or Inf, or None when all are finite."""
    for r in records:
        if r.dtype not in FLOAT_DTYPES or r.numel == 0:
            continue
        uint, mask = _EXPONENT_MASK[r.dtype]
        bits = np.frombuffer(r.data, dtype=uint)
        if ((bits & mask) == mask).any():
            return r.name
    return None


def check_against_spec(records: Iterable[TensorRecord], spec: TensorSpec, *, partial: bool = False) -> None:
    """Raise a named error unless `records` match `spec` by names, dtypes and shapes and are finite.

    With `partial`, tensors may be left out (the training's excluded variables); unknown ones never.
    """
    records = list(records)
    names = {r.name for r in records}
    unknown = sorted(names - spec.keys())
    missing = sorted(spec.keys() - names)
    if unknown:
        raise TensorSpecMismatch(f"unknown tensor names: {', '.join(unknown)}")
    if missing and not partial:
        raise TensorSpecMismatch(f"missing tensor names: {', '.join(missing)}")
    for r in records:
        dtype, shape = spec[r.name]
        if r.dtype != dtype:
            raise TensorSpecMismatch(f"tensor {r.name!r}: dtype {r.dtype}, the model has {dtype}")
        if r.shape != shape:
            raise TensorSpecMismatch(f"tensor {r.name!r}: shape {list(r.shape)}, the model has {list(shape)}")
    bad = first_non_finite(records)
    if bad is not None:
        raise NonFiniteValues(f"tensor {bad!r} holds NaN or Inf values")


def to_torch(record: TensorRecord, *, read_only: bool = False) -> torch.Tensor:
    """A torch tensor over the record's bytes (no copy when the bytes are writable).

    With `read_only`, read-only bytes (msgpack's) are viewed too, never copied: the caller promises
    never to write to the tensor (torch cannot mark it read-only).
    """
    import torch

    dtype = getattr(torch, record.dtype)
    if record.numel == 0:
        return torch.empty(record.shape, dtype=dtype)
    if not record.data.readonly:
        return torch.frombuffer(record.data, dtype=dtype).reshape(record.shape)
    if not read_only:
        return torch.frombuffer(bytearray(record.data), dtype=dtype).reshape(record.shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(record.data, dtype=dtype).reshape(record.shape)


def from_numpy(name: str, array: np.ndarray[Any, Any]) -> TensorRecord:
    """A record over `array`'s bytes (C order; copied only when the array is not contiguous)."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
    return TensorRecord(name=name, dtype=str(array.dtype), shape=tuple(array.shape), data=data)


def from_torch(name: str, tensor: torch.Tensor) -> TensorRecord:
    """A record holding a contiguous CPU copy of `tensor`'s bytes."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return TensorRecord(name=name, dtype=dtype, shape=tuple(t.shape), data=memoryview(raw))


def state_dict_to_records(state: Mapping[str, torch.Tensor]) -> list[TensorRecord]:
    """Records for every tensor of a state dict, in its order."""
    return [from_torch(name, t) for name, t in state.items()]


def records_to_state_dict(records: Iterable[TensorRecord]) -> dict[str, torch.Tensor]:
    """A state dict of torch tensors from records."""
    return {r.name: to_torch(r) for r in records}
