"""Streamed msgpack uploads: the body is checked and re-encoded canonically chunk by chunk.

An update of any size passes through the API in bounded memory: the request body is read as it
arrives (`TensorDocumentReader`), each tensor's header is checked against the model before its data
is read, its data is checked for NaN/Inf one chunk at a time, and the canonical bytes go straight
into `BlobStore.put_stream`. Any error raised on the way aborts the write, so nothing is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

from starlette.requests import Request

from services.api.errors import PayloadTooLarge
from shared.codec import (
    DTYPE_ITEMSIZE,
    FLOAT_DTYPES,
    STREAM_CHUNK_SIZE,
    StreamedField,
    StreamedTensor,
    StreamedTensors,
    TensorDocumentReader,
    TensorRecord,
    tensor_document_prefix,
    tensor_entry_prefix,
)
from shared.errors import NonFiniteValues, TensorSpecMismatch
from shared.tensors import TensorSpec, first_non_finite

_THREAD_BYTES = 256 * 1024
"""Chunks at least this large are hashed in a thread (hashlib releases the GIL) to keep the loop free."""

_SPOOL_MEMORY = 8 * 1024 * 1024
"""A tensor sent ahead of its turn is kept in memory up to this size, then on disk."""


async def request_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, refusing more than `limit` bytes (before reading them all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        if chunk:
            yield chunk


@dataclass
class Written:
    """What a streamed write produced: its size, its SHA-256 and the plain fields read on the way."""

    fields: dict[str, Any]
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)

    @property
    def digest(self) -> str:
        """Hex SHA-256 of the bytes written."""
        return str(self.sha256.hexdigest())

    async def count(self, chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        """Pass `chunks` through, hashing and counting them."""
        async for chunk in chunks:
            if len(chunk) >= _THREAD_BYTES:
                await asyncio.to_thread(self.sha256.update, chunk)
            else:
                self.sha256.update(chunk)
            self.size += len(chunk)
            yield chunk


async def finite_chunks(tensor: StreamedTensor) -> AsyncIterator[bytes]:
    """The tensor's data chunks, each checked for NaN/Inf before it is passed on."""
    floating = tensor.dtype in FLOAT_DTYPES
    itemsize = DTYPE_ITEMSIZE[tensor.dtype]
    async for chunk in tensor.chunks():
        # Every chunk holds whole items (the reader cuts at a multiple of 8 bytes), so the
        # exponent-mask check sees each value intact.
        if floating:
            piece = TensorRecord(tensor.name, tensor.dtype, (len(chunk) // itemsize,), memoryview(chunk))
            if first_non_finite([piece]) is not None:
                raise NonFiniteValues(f"tensor {tensor.name!r} holds NaN or Inf values")
        yield chunk


@dataclass(frozen=True, slots=True)
class ExcludedTensors:
    """The model's tensors a training's `exclude_vars` (`pattern`) leaves out of updates."""

    names: frozenset[str]
    pattern: str | None

    def refuse(self, name: str) -> None:
        """Refuse an update that carries an excluded tensor, naming it and the pattern."""
        if name in self.names:
            raise TensorSpecMismatch(
                f"tensor {name!r} matches the training's exclude_vars {self.pattern!r}: "
                "leave it out of updates (it keeps the server's value)"
            )


def check_header(tensor: StreamedTensor, spec: TensorSpec, excluded: ExcludedTensors | None = None) -> None:
    """Refuse a tensor whose name, dtype or shape does not fit the model (before its data is read)."""
    if excluded is not None:
        excluded.refuse(tensor.name)
    if tensor.name not in spec:
        raise TensorSpecMismatch(f"unknown tensor names: {tensor.name}")
    dtype, shape = spec[tensor.name]
    if tensor.dtype != dtype:
        raise TensorSpecMismatch(f"tensor {tensor.name!r}: dtype {tensor.dtype}, the model has {dtype}")
    if tensor.shape != shape:
        raise TensorSpecMismatch(
            f"tensor {tensor.name!r}: shape {list(tensor.shape)}, the model has {list(shape)}"
        )


async def canonical_update(
    items: AsyncIterator[StreamedField | StreamedTensor],
    spec: TensorSpec,
    fields: dict[str, Any],
    excluded: ExcludedTensors | None = None,
) -> AsyncIterator[bytes]:
    """The canonical stored form of an update, in the model's tensor order, from the streamed items.

    `spec` is what the update must hold (the model minus `excluded`, which are refused by name).
    Plain fields met on the way go into `fields`. Tensors sent in model order pass straight through;
    one sent ahead of its turn waits in a spool file (memory up to `_SPOOL_MEMORY`, then disk).
    """
    order = list(spec)
    position = {name: i for i, name in enumerate(order)}
    spooled: dict[int, IO[bytes]] = {}
    seen: set[str] = set()
    turn = 0
    yield tensor_document_prefix(len(order))
    try:
        async for item in items:
            if isinstance(item, StreamedField):
                fields[item.name] = item.value
                continue
            check_header(item, spec, excluded)
            seen.add(item.name)
            prefix = tensor_entry_prefix(item.name, item.dtype, item.shape, item.nbytes)
            if position[item.name] != turn:
                spooled[position[item.name]] = await _spool(prefix, finite_chunks(item))
                continue
            yield prefix
            async for chunk in finite_chunks(item):
                yield chunk
            turn += 1
            while turn in spooled:
                async for chunk in _unspool(spooled.pop(turn)):
                    yield chunk
                turn += 1
        missing = sorted(spec.keys() - seen)
        if missing:
            raise TensorSpecMismatch(f"missing tensor names: {', '.join(missing)}")
    finally:
        for spool in spooled.values():
            spool.close()


async def in_order(
    items: AsyncIterator[StreamedField | StreamedTensor],
    count: int,
    fields: dict[str, Any],
    spec: dict[str, list[Any]],
) -> AsyncIterator[bytes]:
    """The canonical stored form of a model: its tensors in the order sent, each checked for NaN/Inf.

    Plain fields met on the way go into `fields`, each tensor's `[dtype, shape]` into `spec`.
    """
    yield tensor_document_prefix(count)
    async for item in items:
        if isinstance(item, StreamedField):
            fields[item.name] = item.value
            continue
        spec[item.name] = [item.dtype, list(item.shape)]
        yield tensor_entry_prefix(item.name, item.dtype, item.shape, item.nbytes)
        async for chunk in finite_chunks(item):
            yield chunk


async def spool(chunks: AsyncIterator[bytes]) -> IO[bytes]:
    """Keep `chunks` in a spool file (memory up to `_SPOOL_MEMORY`, then disk), rewound for reading."""
    return await _spool(b"", chunks)


def unspool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    """Read a spool file back in chunks, closing it at the end."""
    return _unspool(spool)


async def _spool(prefix: bytes, chunks: AsyncIterator[bytes]) -> IO[bytes]:
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115 - closed by the caller
    try:
        spool.write(prefix)
        async for chunk in chunks:
            await asyncio.to_thread(spool.write, chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


async def _unspool(spool: IO[bytes]) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(spool.read, STREAM_CHUNK_SIZE):
            yield chunk
    finally:
        spool.close()


async def items_after(reader: TensorDocumentReader) -> AsyncIterator[StreamedField | StreamedTensor]:
    """The reader's remaining fields and tensors (the tensor map's start was already read)."""
    while (item := await reader.next_item()) is not None:
        if not isinstance(item, StreamedTensors):  # the reader refuses a second tensor map
            yield item
