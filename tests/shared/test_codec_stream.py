"""The streamed tensor-document reader: canonical bytes identical to `encode_tensors`, every field
decoded, data in bounded chunks whatever the input chunking, and named errors for bad bodies."""

from __future__ import annotations

import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from shared.codec import (
    DTYPE_ITEMSIZE,
    StreamedField,
    StreamedTensor,
    StreamedTensors,
    TensorDocumentReader,
    TensorRecord,
    encode_tensors,
    packb,
    tensor_document_prefix,
    tensor_entry_prefix,
    tensor_map,
)
from shared.errors import MalformedPayload, UnsupportedDtype

MiB = 1024 * 1024


def rec(name: str, dtype: str, n: int) -> TensorRecord:
    """A tensor of `n` items of `dtype` with distinct bytes."""
    data = (np.arange(n * DTYPE_ITEMSIZE[dtype], dtype=np.uint64) % 251).astype(np.uint8).tobytes()
    return TensorRecord(name=name, dtype=dtype, shape=(n,), data=memoryview(data))


async def pieces(body: bytes, size: int) -> AsyncIterator[bytes]:
    """`body` cut into pieces of `size` bytes, as a network stream would deliver it."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def reencode(reader: TensorDocumentReader) -> tuple[bytes, list[StreamedField], list[int]]:
    """Walk a document: its canonical re-encoding, its plain fields and every data chunk's size."""
    out, fields, sizes = bytearray(), [], []
    while (item := await reader.next_item()) is not None:
        if isinstance(item, StreamedTensors):
            out += tensor_document_prefix(item.count)
        elif isinstance(item, StreamedTensor):
            out += tensor_entry_prefix(item.name, item.dtype, item.shape, item.nbytes)
            async for chunk in item.chunks():
                sizes.append(len(chunk))
                out += chunk
        else:
            fields.append(item)
    return bytes(out), fields, sizes


# Sizes around every bin header width (bin8 / bin16 / bin32) and empty data.
SIZES = [0, 1, 255, 256, 65535, 65536, 70000]


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 30], ids=["1B", "7B", "4KiB", "whole"])
async def test_reencoding_is_byte_identical_to_encode_tensors(piece: int) -> None:
    """Prefixes plus streamed data give exactly `encode_tensors`' bytes, however the body is cut."""
    records = [rec(f"u8-{n}", "uint8", n) for n in SIZES]
    records += [rec(f"{dtype}", dtype, 3) for dtype in DTYPE_ITEMSIZE]
    records += [TensorRecord("matrix", "float32", (2, 0, 3), memoryview(b""))]
    body = packb({"tensors": tensor_map(records)})
    canonical, fields, _ = await reencode(TensorDocumentReader(pieces(body, piece), chunk_size=4096))
    assert canonical == encode_tensors(records)
    assert fields == []


@pytest.mark.parametrize("count", [1, 15, 16, 300])
async def test_document_prefix_matches_every_map_header_width(count: int) -> None:
    """fixmap, map16: the document prefix is what `encode_tensors` writes for that many tensors."""
    records = [rec(f"t{i}", "int8", 1) for i in range(count)]
    expected = encode_tensors(records)
    canonical, _, _ = await reencode(TensorDocumentReader(pieces(expected, 5)))
    assert canonical == expected
    assert expected.startswith(tensor_document_prefix(count))


async def test_fields_before_and_after_the_tensors_are_decoded() -> None:
    """Plain fields of every kind come back decoded, in body order, around the tensor map."""
    metrics: dict[str, Any] = {"loss": 0.25, "acc": 1, "neg": -70000, "ok": True, "none": None}
    body = packb(
        {
            "round": 3,
            "name": "x" * 300,
            "tensors": tensor_map([rec("w", "float32", 4)]),
            "num_examples": 2**40,
            "metrics": metrics,
            "tags": list(range(20)),
            "blob": b"\x00" * 300,
        }
    )
    _, fields, _ = await reencode(TensorDocumentReader(pieces(body, 3)))
    assert [(f.name, f.value) for f in fields] == [
        ("round", 3),
        ("name", "x" * 300),
        ("num_examples", 2**40),
        ("metrics", metrics),
        ("tags", list(range(20))),
        ("blob", b"\x00" * 300),
    ]


async def test_data_arrives_in_whole_chunks_of_the_chunk_size() -> None:
    """Every data chunk but a tensor's last is exactly the chunk size (whole items of any dtype)."""
    body = packb({"tensors": tensor_map([rec("w", "float64", 5000), rec("b", "float16", 3)])})
    _, _, sizes = await reencode(TensorDocumentReader(pieces(body, 1000), chunk_size=4096))
    assert sizes == [4096] * 9 + [40000 - 9 * 4096, 6]


async def test_unread_data_is_skipped() -> None:
    """Asking for the next item without reading a tensor's data skips it."""
    body = packb({"tensors": tensor_map([rec("a", "int32", 1000), rec("b", "int8", 2)]), "round": 1})
    reader = TensorDocumentReader(pieces(body, 100))
    items = []
    while (item := await reader.next_item()) is not None:
        items.append(item.name if isinstance(item, StreamedTensor | StreamedField) else "tensors")
    assert items == ["tensors", "a", "b", "round"]


async def test_a_large_tensor_streams_in_bounded_memory() -> None:
    """A 64 MiB tensor passes through the reader while it holds a few chunks at most."""
    size = 64 * MiB
    head = b"\x81" + packb("tensors") + b"\x81" + packb("w") + b"\x83"
    head += packb("dtype") + packb("uint8") + packb("shape") + packb([size]) + packb("data")
    head += b"\xc6" + size.to_bytes(4, "big")
    block = bytes(range(256)) * 256

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(size // len(block)):
            yield block

    reader = TensorDocumentReader(body())
    tracemalloc.start()
    try:
        total = 0
        while (item := await reader.next_item()) is not None:
            if isinstance(item, StreamedTensor):
                async for chunk in item.chunks():
                    total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 8 * MiB, peak


def _tensor(spec: dict[str, Any]) -> bytes:
    return packb({"tensors": {"w": spec}, "round": 1})


BAD: dict[str, tuple[bytes, type[Exception], str]] = {
    "empty": (b"", MalformedPayload, "not valid msgpack"),
    "never-used-byte": (b"\xc1\x00", MalformedPayload, "not valid msgpack"),
    "array": (packb([1, 2]), MalformedPayload, "must be a msgpack map, got list"),
    "integer": (packb(7), MalformedPayload, "must be a msgpack map, got int"),
    "nil": (packb(None), MalformedPayload, "must be a msgpack map, got NoneType"),
    "truncated": (packb({"tensors": tensor_map([rec("w", "int8", 50)])})[:-10], MalformedPayload, "ends in"),
    "trailing": (packb({"round": 1}) + b"\x01", MalformedPayload, "extra bytes"),
    "tensors-list": (packb({"tensors": [1]}), MalformedPayload, "non-empty map"),
    "tensors-empty": (packb({"tensors": {}}), MalformedPayload, "non-empty map"),
    "data-first": (
        _tensor({"data": b"\0" * 4, "dtype": "float32", "shape": [1]}),
        MalformedPayload,
        "'dtype' and 'shape' must come before 'data'",
    ),
    "data-before-shape": (
        _tensor({"dtype": "float32", "data": b"\0" * 4, "shape": [1]}),
        MalformedPayload,
        "must come before 'data'",
    ),
    "no-data": (_tensor({"dtype": "float32", "shape": [1]}), MalformedPayload, "'data' must be raw bytes"),
    "text-data": (
        _tensor({"dtype": "float32", "shape": [1], "data": "abcd"}),
        MalformedPayload,
        "'data' must be raw bytes",
    ),
    "short-data": (
        _tensor({"dtype": "float32", "shape": [2], "data": b"\0" * 4}),
        MalformedPayload,
        "expected 8",
    ),
    "complex": (
        _tensor({"dtype": "complex64", "shape": [1], "data": b"\0" * 8}),
        UnsupportedDtype,
        "complex64",
    ),
    "bad-shape": (
        _tensor({"dtype": "float32", "shape": [-1], "data": b""}),
        MalformedPayload,
        "non-negative integers",
    ),
    "tensor-not-map": (_tensor([1]), MalformedPayload, "must be a map with dtype, shape and data"),
    "empty-name": (packb({"tensors": {"": {}}}), MalformedPayload, "non-empty string"),
    "repeated-key": (
        b"\x81"
        + packb("tensors")
        + b"\x81"
        + packb("w")
        + b"\x84"
        + packb("dtype")
        + packb("int8")
        + packb("shape")
        + packb([1])
        + packb("data")
        + b"\xc4\x01\x00"
        + packb("dtype")
        + packb("int8"),
        MalformedPayload,
        "appears twice",
    ),
    "too-deep": (b"\x81" + packb("x") + b"\x91" * 100 + b"\x01", MalformedPayload, "nests deeper"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_bodies_raise_named_errors(case: str) -> None:
    """Each malformed body raises its named error, with a detail that says what is wrong."""
    body, error, needle = BAD[case]
    with pytest.raises(error) as raised:
        await reencode(TensorDocumentReader(pieces(body, 3)))
    assert needle in raised.value.detail


async def test_large_plain_fields_are_refused() -> None:
    """A plain field above `max_field_bytes` is refused instead of being held in memory."""
    body = packb({"comment": "x" * 5000, "tensors": tensor_map([rec("w", "int8", 1)])})
    with pytest.raises(MalformedPayload, match="larger than 1024 bytes"):
        await reencode(TensorDocumentReader(pieces(body, 64), max_field_bytes=1024))


async def test_a_second_tensor_map_is_refused() -> None:
    """Two `tensors` keys in one body are refused (a decoder would silently keep the last)."""
    one = packb({"tensors": tensor_map([rec("w", "int8", 1)])})
    body = b"\x82" + one[1:] + one[1:]
    with pytest.raises(MalformedPayload, match="appears twice"):
        await reencode(TensorDocumentReader(pieces(body, 64)))


def test_chunk_size_must_hold_whole_items() -> None:
    """A chunk size that is not a multiple of 8 could split an item; it is refused."""

    async def nothing() -> AsyncIterator[bytes]:
        yield b""

    with pytest.raises(ValueError, match="multiple of 8"):
        TensorDocumentReader(nothing(), chunk_size=1001)
