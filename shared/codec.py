"""The only module that speaks msgpack: messages to bytes and back, and tensor payloads.

Tensors travel as a map `name -> {"dtype": str, "shape": [int], "data": bytes}` (raw little-endian
bytes, C order). Decoding never builds a tensor object and does no per-element work: it yields
`TensorRecord`s over the bytes msgpack hands back. Nothing here ever unpickles.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Union, get_args, get_origin
from uuid import UUID

import msgpack

from shared.errors import MalformedPayload, UnsupportedDtype
from shared.events import Message

_UUID_EXT = 1

DTYPE_ITEMSIZE: Mapping[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
"""Every dtype fedhub carries, with its size in bytes."""

FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRecord:
    """One named tensor as raw bytes plus dtype and shape; `data` may be a view into a larger buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


# --- messages ---------------------------------------------------------------------------------


def _default(obj: object) -> object:
    if isinstance(obj, UUID):
        return msgpack.ExtType(_UUID_EXT, obj.bytes)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | frozenset):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> object:
    if code == _UUID_EXT:
        return UUID(bytes=data)
    return msgpack.ExtType(code, data)


def encode_message(message: Message) -> bytes:
    """Encode a message's fields (not its type: that rides in the envelope) as msgpack."""
    return packb(message)


def decode_message(cls: type[Message], body: bytes) -> Message:
    """Decode `body` into an instance of `cls`, rebuilding UUIDs, enums, datetimes and nested classes."""
    try:
        raw = unpackb(body)
    except (ValueError, TypeError) as exc:  # TypeError: unhashable map keys
        raise MalformedPayload(f"message body for {cls.__name__} is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedPayload(f"message body for {cls.__name__} is not a map")
    try:
        return typing.cast(Message, _build(cls, raw))
    except (TypeError, ValueError) as exc:  # missing fields, malformed UUID, unknown enum value
        raise MalformedPayload(f"message body for {cls.__name__} does not fit its fields: {exc}") from exc


def packb(obj: object) -> bytes:
    """Encode any plain value (maps, lists, UUIDs, datetimes, enums, dataclasses) as msgpack."""
    packed: bytes = msgpack.packb(obj, default=_default, use_bin_type=True, datetime=True)
    return packed


def unpackb(data: bytes | memoryview) -> Any:
    """Decode msgpack, turning our UUID extension back into UUIDs and timestamps into aware datetimes."""
    return msgpack.unpackb(data, raw=False, ext_hook=_ext_hook, timestamp=3, strict_map_key=False)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Mapping[str, Any]) -> object:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    origin = get_origin(tp)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _convert(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        args = get_args(tp)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_convert(item, v) for v in value)
    if origin in (list, frozenset, set):
        (item,) = get_args(tp)
        return origin(_convert(item, v) for v in value)
    if origin is dict or tp is Any:
        return value
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return _build(tp, value)
        if issubclass(tp, enum.Enum):
            return tp(value)
        if tp is UUID and isinstance(value, str):
            return UUID(value)
        if tp is datetime and isinstance(value, str):
            return datetime.fromisoformat(value)
    return value


# --- tensors ----------------------------------------------------------------------------------


def encode_tensors(records: Iterable[TensorRecord]) -> bytes:
    """Encode tensors as the canonical msgpack map (the form stored in the blob store)."""
    return packb({"tensors": tensor_map(records)})


def tensor_map(records: Iterable[TensorRecord]) -> dict[str, dict[str, object]]:
    """The wire map of tensors, for embedding in a larger msgpack document."""
    return {r.name: {"dtype": r.dtype, "shape": list(r.shape), "data": r.data} for r in records}


def decode_tensors(data: bytes | memoryview) -> list[TensorRecord]:
    """Decode a canonical tensor document (`{"tensors": {...}}`) into records."""
    doc = _unpack_document(data)
    return parse_tensor_map(doc.get("tensors"))


def decode_document(data: bytes | memoryview) -> dict[str, Any]:
    """Decode a msgpack request body that must be a map, with a clear error when it is not."""
    return _unpack_document(data)


def _unpack_document(data: bytes | memoryview) -> dict[str, Any]:
    try:
        doc = unpackb(data)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise MalformedPayload(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict):
        raise MalformedPayload(f"body must be a msgpack map, got {type(doc).__name__}")
    return doc


def parse_tensor_map(raw: object) -> list[TensorRecord]:
    """Validate the structure of a tensor map and return records over the decoded bytes."""
    if not isinstance(raw, dict) or not raw:
        raise MalformedPayload("'tensors' must be a non-empty map of name -> {dtype, shape, data}")
    records = []
    for name, spec in raw.items():
        if not isinstance(name, str) or not name:
            raise MalformedPayload(f"tensor name {name!r} must be a non-empty string")
        if not isinstance(spec, dict):
            raise MalformedPayload(f"tensor {name!r} must be a map with dtype, shape and data")
        records.append(make_record(name, spec.get("dtype"), spec.get("shape"), spec.get("data")))
    return records


def make_record(name: str, dtype: object, shape: object, data: object) -> TensorRecord:
    """Check one tensor's dtype, shape and byte length and build its record."""
    if not isinstance(dtype, str):
        raise MalformedPayload(f"tensor {name!r}: 'dtype' must be a string")
    if dtype not in DTYPE_ITEMSIZE:
        raise UnsupportedDtype(
            f"tensor {name!r}: dtype {dtype!r} is not supported (supported: {', '.join(DTYPE_ITEMSIZE)})"
        )
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise MalformedPayload(f"tensor {name!r}: 'shape' must be a list of non-negative integers")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPayload(f"tensor {name!r}: 'data' must be raw bytes")
    view = memoryview(data).cast("B")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if view.nbytes != expected:
        raise MalformedPayload(
            f"tensor {name!r}: {view.nbytes} bytes of data for shape {list(shape)} of {dtype} "
            f"(expected {expected})"
        )
    return TensorRecord(name=name, dtype=dtype, shape=tuple(shape), data=view)
