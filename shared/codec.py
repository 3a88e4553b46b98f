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
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
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


def _build(cls: type, raw: Mapping[str, Any]) -> object:
    kwargs = {}
    for name, convert in _fields(cls):
        if name in raw:
            value = raw[name]
            kwargs[name] = value if convert is None or value is None else convert(value)
    return cls(**kwargs)


Converter = Callable[[Any], Any]


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Converter | None], ...]:
    """Each field of a message class with the converter of its decoded value (None: as decoded).

    Worked out once per class from its type hints: every message consumed is built this way (the
    orchestrator's share of a 1,000-client round went to re-reading the hints per field)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))


@functools.cache
def _converter(tp: Any) -> Converter | None:
    """How a decoded value becomes a `tp` (None values pass through); None when it already is one."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        return _converter(options[0]) if len(options) == 1 else None
    if origin in (tuple, list, frozenset, set):
        args = get_args(tp)
        if origin is tuple:
            args = (args[0],) if len(args) == 2 and args[1] is Ellipsis else (Any,)
        item = _converter(args[0])
        if item is None:
            return typing.cast(Converter, origin)
        return functools.partial(_each, origin, item)
    if origin is dict or tp is Any or not isinstance(tp, type):
        return None
    if dataclasses.is_dataclass(tp):
        return functools.partial(_build, tp)
    if issubclass(tp, enum.Enum):
        return tp
    if tp is UUID:
        return _uuid
    if tp is datetime:
        return _datetime
    return None


def _each(container: Callable[[Iterable[Any]], Any], item: Converter, value: Iterable[Any]) -> Any:
    return container(None if v is None else item(v) for v in value)


def _uuid(value: Any) -> Any:
    return UUID(value) if isinstance(value, str) else value


def _datetime(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


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
    dtype_name, dims, expected = check_tensor_header(name, dtype, shape)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPayload(f"tensor {name!r}: 'data' must be raw bytes")
    view = memoryview(data).cast("B")
    if view.nbytes != expected:
        raise MalformedPayload(
            f"tensor {name!r}: {view.nbytes} bytes of data for shape {list(dims)} of {dtype_name} "
            f"(expected {expected})"
        )
    return TensorRecord(name=name, dtype=dtype_name, shape=dims, data=view)


# --- streamed tensor documents ----------------------------------------------------------------
#
# msgpack's own Unpacker hands back every bin object whole, so a 500 MB tensor would sit in memory
# at least once. The reader below understands just enough of the (closed, well-specified) format to
# walk a tensor document as it arrives: plain fields are delimited and handed to `unpackb`, tensor
# data is passed on in chunks and never held whole.

STREAM_CHUNK_SIZE = 1024 * 1024
"""Bytes per data chunk the streamed reader yields; a multiple of every dtype's item size."""

_TRUNCATED = "body is not valid msgpack (it ends in the middle of a value)"
_MAX_DEPTH = 64
_TENSORS_RULE = "'tensors' must be a non-empty map of name -> {dtype, shape, data}"
# Python type names of what a first byte announces, for "must be a map, got ..." answers.
_KIND_NAMES = {"array": "list", "str": "str", "bin": "bytes", "ext": "ExtType"}


@dataclasses.dataclass(frozen=True, slots=True)
class StreamedField:
    """A top-level field of a streamed tensor document other than `tensors`, decoded."""

    name: str
    value: Any


@dataclasses.dataclass(frozen=True, slots=True)
class StreamedTensors:
    """The start of the `tensors` map of a streamed document: how many tensors follow."""

    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamedTensor:
    """One tensor's header, read before its data; `chunks()` then yields the data in order.

    Every chunk but the last holds `STREAM_CHUNK_SIZE` bytes (or the reader's chunk size), so each
    chunk holds whole items of the dtype. The data must be consumed (or is skipped) before the
    reader moves on.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    _reader: TensorDocumentReader = dataclasses.field(repr=False, compare=False)

    def chunks(self) -> AsyncIterator[bytes]:
        """The tensor's raw bytes in chunks; may be iterated once."""
        return self._reader._data_chunks(self)


StreamedItem = StreamedField | StreamedTensors | StreamedTensor


class TensorDocumentReader:
    """Walk a msgpack tensor document (`{"tensors": {...}, field: value, ...}`) as its bytes arrive.

    `next_item()` returns, in body order, each plain top-level field (`StreamedField`), the start
    of the tensor map (`StreamedTensors`) followed by one `StreamedTensor` per tensor, and finally
    None once the whole body was read. Inside each tensor map `dtype` and `shape` must come before
    `data` (every fedhub encoder writes them in that order); dtype, shape and byte length are checked
    with the same rules and messages as `make_record` before any data is read. Plain fields larger
    than `max_field_bytes` are refused, so only tensor data can be large and that is never held whole.
    """

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        *,
        chunk_size: int = STREAM_CHUNK_SIZE,
        max_field_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if chunk_size <= 0 or chunk_size % 8:
            raise ValueError("chunk_size must be a positive multiple of 8")
        self._source = chunks.__aiter__()
        self._buf = bytearray()
        self._pos = 0
        self._chunk_size = chunk_size
        self._max_field = max_field_bytes
        self._fields_left: int | None = None
        self._tensors_left = 0
        self._seen_tensors = False
        self._names: set[str] = set()
        self._pending: StreamedTensor | None = None
        self._after_data: tuple[str, int, set[str]] | None = None
        self._done = False

    # -- bytes ---------------------------------------------------------------------------------

    async def _more(self) -> bool:
        try:
            chunk = await anext(self._source)
        except StopAsyncIteration:
            return False
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    async def _take(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not await self._more():
                raise MalformedPayload(_TRUNCATED)
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    async def _at_end(self) -> bool:
        while len(self._buf) == self._pos:
            if not await self._more():
                return True
        return False

    async def _head(self) -> tuple[str, int, bytes]:
        """Read one value's header: (kind, length or count, the header's bytes)."""
        first = await self._take(1)
        b = first[0]
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
            return "scalar", 0, first
        if 0x80 <= b <= 0x8F:
            return "map", b & 0x0F, first
        if 0x90 <= b <= 0x9F:
            return "array", b & 0x0F, first
        if 0xA0 <= b <= 0xBF:
            return "str", b & 0x1F, first
        if b in _FIXED_SCALARS:
            return "scalar", _FIXED_SCALARS[b], first
        if b in _FIXEXT:
            return "ext", _FIXEXT[b] + 1, first
        if b in _SIZED:
            kind, width = _SIZED[b]
            raw = await self._take(width)
            length = int.from_bytes(raw, "big")
            return kind, length + 1 if kind == "ext" else length, first + raw
        raise MalformedPayload(f"body is not valid msgpack (byte 0x{b:02x} starts no value)")

    async def _raw_value(self, limit: int, what: str) -> bytes:
        """The encoded bytes of one whole value (at most `limit`), to be decoded by `unpackb`."""
        out = bytearray()

        async def walk(depth: int) -> None:
            if depth > _MAX_DEPTH:
                raise MalformedPayload(f"{what} nests deeper than {_MAX_DEPTH} levels")
            kind, n, head = await self._head()
            out.extend(head)
            if kind in ("map", "array"):
                for _ in range(n * 2 if kind == "map" else n):
                    await walk(depth + 1)
            elif n:
                if len(out) + n > limit:
                    raise MalformedPayload(f"{what} is larger than {limit} bytes")
                out.extend(await self._take(n))
            if len(out) > limit:
                raise MalformedPayload(f"{what} is larger than {limit} bytes")

        await walk(0)
        return bytes(out)

    async def _value(self, what: str) -> Any:
        raw = await self._raw_value(self._max_field, what)
        try:
            return unpackb(raw)
        except Exception as exc:  # msgpack raises several unrelated types for garbage input
            raise MalformedPayload(f"body is not valid msgpack ({type(exc).__name__}: {exc})") from exc

    # -- document ------------------------------------------------------------------------------

    async def next_item(self) -> StreamedItem | None:
        """The next field, tensor-map start or tensor header in body order; None at the end."""
        if self._pending is not None:
            async for _ in self._pending.chunks():  # skipped: the caller did not want the data
                pass
        if self._after_data is not None:
            await self._finish_tensor()
        if self._done:
            return None
        if self._fields_left is None:
            if await self._at_end():
                raise MalformedPayload("body is not valid msgpack (the body is empty)")
            kind, n, head = await self._head()
            if kind != "map":
                got = _KIND_NAMES.get(kind) or _scalar_name(head[0])
                raise MalformedPayload(f"body must be a msgpack map, got {got}")
            self._fields_left = n
        if self._tensors_left:
            self._tensors_left -= 1
            return await self._tensor_header()
        while self._fields_left:
            self._fields_left -= 1
            key = await self._value("a field name")
            if key != "tensors":
                value = await self._value(f"field {key!r}")
                if isinstance(key, str):
                    return StreamedField(key, value)
                continue  # non-string keys name nothing fedhub reads
            if self._seen_tensors:
                raise MalformedPayload("'tensors' appears twice in the body")
            self._seen_tensors = True
            kind, n, _ = await self._head()
            if kind != "map" or n == 0:
                raise MalformedPayload(_TENSORS_RULE)
            self._tensors_left = n
            return StreamedTensors(n)
        if not await self._at_end():
            raise MalformedPayload("body is not valid msgpack (extra bytes after the top-level map)")
        self._done = True
        return None

    async def _tensor_header(self) -> StreamedTensor:
        name = await self._value("a tensor name")
        if not isinstance(name, str) or not name:
            raise MalformedPayload(f"tensor name {name!r} must be a non-empty string")
        if name in self._names:
            raise MalformedPayload(f"tensor {name!r} appears twice in 'tensors'")
        self._names.add(name)
        kind, n, _ = await self._head()
        if kind != "map":
            raise MalformedPayload(f"tensor {name!r} must be a map with dtype, shape and data")
        seen: set[str] = set()
        values: dict[str, Any] = {}
        for left in range(n - 1, -1, -1):
            key = await self._value(f"a key of tensor {name!r}")
            if key in seen:
                raise MalformedPayload(f"tensor {name!r}: key {key!r} appears twice")
            if isinstance(key, str):
                seen.add(key)
            if key != "data":
                value = await self._value(f"{key!r} of tensor {name!r}")
                if key in ("dtype", "shape"):
                    values[key] = value
                continue
            if not {"dtype", "shape"} <= seen:
                raise MalformedPayload(
                    f"tensor {name!r}: 'dtype' and 'shape' must come before 'data' in a msgpack body"
                )
            dtype, shape, expected = check_tensor_header(name, values["dtype"], values["shape"])
            kind, nbytes, _ = await self._head()
            if kind != "bin":
                raise MalformedPayload(f"tensor {name!r}: 'data' must be raw bytes")
            if nbytes != expected:
                raise MalformedPayload(
                    f"tensor {name!r}: {nbytes} bytes of data for shape {list(shape)} of {dtype} "
                    f"(expected {expected})"
                )
            tensor = StreamedTensor(name, dtype, shape, nbytes, self)
            self._pending = tensor
            self._after_data = (name, left, seen)
            return tensor
        check_tensor_header(name, values.get("dtype"), values.get("shape"))
        raise MalformedPayload(f"tensor {name!r}: 'data' must be raw bytes")

    async def _data_chunks(self, tensor: StreamedTensor) -> AsyncIterator[bytes]:
        if self._pending is not tensor:
            raise RuntimeError(f"the data of tensor {tensor.name!r} was already read")
        self._pending = None
        remaining, piece = tensor.nbytes, bytearray()
        while remaining:
            available = len(self._buf) - self._pos
            if not available:
                if not await self._more():
                    raise MalformedPayload(_TRUNCATED)
                continue
            take = min(remaining, available, self._chunk_size - len(piece))
            piece += self._buf[self._pos : self._pos + take]
            self._pos += take
            remaining -= take
            if len(piece) == self._chunk_size or not remaining:
                yield bytes(piece)
                piece = bytearray()

    async def _finish_tensor(self) -> None:
        assert self._after_data is not None
        name, left, seen = self._after_data
        self._after_data = None
        for _ in range(left):
            key = await self._value(f"a key of tensor {name!r}")
            if key in seen:
                raise MalformedPayload(f"tensor {name!r}: key {key!r} appears twice")
            if isinstance(key, str):
                seen.add(key)
            await self._value(f"{key!r} of tensor {name!r}")


_FIXED_SCALARS = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_SIZED = {
    0xC4: ("bin", 1),
    0xC5: ("bin", 2),
    0xC6: ("bin", 4),
    0xC7: ("ext", 1),
    0xC8: ("ext", 2),
    0xC9: ("ext", 4),
    0xD9: ("str", 1),
    0xDA: ("str", 2),
    0xDB: ("str", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}


def _scalar_name(first: int) -> str:
    if first == 0xC0:
        return "NoneType"
    if first in (0xC2, 0xC3):
        return "bool"
    if first in (0xCA, 0xCB):
        return "float"
    return "int"


def check_tensor_header(name: str, dtype: object, shape: object) -> tuple[str, tuple[int, ...], int]:
    """Check a tensor's dtype and shape (also for `make_record`); return them with the expected byte count."""
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
    return dtype, tuple(shape), math.prod(shape) * DTYPE_ITEMSIZE[dtype]


def tensor_document_prefix(count: int) -> bytes:
    """The bytes that open a canonical tensor document of `count` tensors (see `encode_tensors`)."""
    return b"\x81" + packb("tensors") + _container_header(count, 0x80, 0xDE)


def tensor_entry_prefix(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    """The bytes of one canonical tensor entry up to its data; `nbytes` of raw data follow.

    A canonical document is `tensor_document_prefix(n)` then, per tensor, this prefix and its data:
    byte for byte what `encode_tensors` writes for the same tensors in the same order.
    """
    head = packb(name) + b"\x83" + packb("dtype") + packb(dtype) + packb("shape") + packb(list(shape))
    return head + packb("data") + _bin_header(nbytes)


def _container_header(n: int, fix: int, code16: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    if n < 1 << 16:
        return bytes([code16]) + n.to_bytes(2, "big")
    return bytes([code16 + 1]) + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")
