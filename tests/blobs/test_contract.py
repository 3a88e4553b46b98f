"""The blob store contract, the same for every store: atomic puts that never overwrite, chunked
streaming in bounded memory, and one consistent winner when two writers race for a key."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from shared.blobs import BlobNotFound, BlobStore, LocalBlobStore, PostgresBlobStore, TieredBlobStore

MiB = 1024 * 1024


@pytest.fixture(
    params=["local", "rows-sqlite", "tiered", pytest.param("postgres", marks=pytest.mark.integration)]
)
async def store(request, tmp_path) -> AsyncIterator[BlobStore]:
    """Each store under test, chunking at 1 MiB: files; rows on SQLite; both (the embedded default:
    rows up to 64 KiB, so the multi-MiB blobs here are files and the small ones rows); rows in the
    session's migrated PostgreSQL database."""
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path / 'blobs.db'}"
    blobs: BlobStore
    if request.param == "local":
        blobs = LocalBlobStore(tmp_path / "blobs", chunk_size=MiB)
    elif request.param in ("rows-sqlite", "tiered"):
        rows = PostgresBlobStore(sqlite_url, chunk_size=MiB)
        await rows.create_tables()
        files = LocalBlobStore(tmp_path / "blobs", chunk_size=MiB)
        blobs = (
            rows if request.param == "rows-sqlite" else TieredBlobStore(rows, files, max_row_bytes=64 * 1024)
        )
    else:
        blobs = PostgresBlobStore(request.getfixturevalue("postgres_url"), chunk_size=MiB)
    yield blobs
    await blobs.close()


def key() -> str:
    """A fresh key."""
    return f"update/{uuid4()}"


def pattern(index: int, size: int = MiB) -> bytes:
    """Distinct, reproducible bytes for chunk `index` (a check would catch reordered chunks)."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def chunks_of(parts: list[bytes]) -> AsyncIterator[bytes]:
    """Yield `parts`, letting other tasks run between them as a network upload would."""
    for part in parts:
        await asyncio.sleep(0)
        yield part


async def test_put_get_exists_delete(store):
    """A stored blob reads back whole; after delete it is gone and reading it is BlobNotFound."""
    k, data = key(), b"\x00weights\xff" * 1000
    assert await store.exists(k) is False
    assert await store.put(k, data) is True
    assert await store.exists(k) is True
    assert await store.get(k) == data
    await store.delete(k)
    assert await store.exists(k) is False
    with pytest.raises(BlobNotFound):
        await store.get(k)
    await store.delete(k)  # deleting a missing key is not an error


async def test_get_many_reads_every_key_in_order(store):
    """`get_many`: each key's bytes in the order asked (a repeated key twice, a blob of several
    chunks whole, an empty one empty), None for a missing key and for a key the store refuses."""
    small, big, empty, missing = key(), key(), key(), key()
    await store.put(small, b"small")
    await store.put(big, pattern(1, 2 * MiB + 123))
    await store.put(empty, b"")
    got = await store.get_many([big, missing, small, "../escape", empty, small])
    assert got == [pattern(1, 2 * MiB + 123), None, b"small", None, b"", b"small"]
    assert await store.get_many([]) == []


async def test_put_of_an_existing_key_keeps_the_first(store):
    """A second put under a key returns False and leaves the first bytes."""
    k = key()
    assert await store.put(k, b"first") is True
    assert await store.put(k, b"second") is False
    assert await store.put_stream(k, chunks_of([b"third"])) is False
    assert await store.get(k) == b"first"


async def test_empty_blob(store):
    """An empty blob exists and reads back empty, whole or streamed."""
    k = key()
    assert await store.put(k, b"") is True
    assert await store.exists(k) is True
    assert await store.get(k) == b""
    assert [c async for c in store.open_stream(k)] == []


async def test_multi_chunk_put_reads_back_in_bounded_chunks(store):
    """Odd-sized input, from put and from put_stream, streams back in chunks of at most chunk_size."""
    data = b"".join(pattern(i, 700_000) for i in range(4))  # 2.8 MB, not a multiple of 1 MiB
    k1, k2 = key(), key()
    assert await store.put(k1, memoryview(data)) is True
    assert await store.put_stream(
        k2, chunks_of([data[i : i + 300_001] for i in range(0, len(data), 300_001)])
    )
    for k in (k1, k2):
        chunks = [c async for c in store.open_stream(k)]
        assert b"".join(chunks) == data
        assert max(len(c) for c in chunks) <= MiB
        assert await store.get(k) == data


async def test_open_stream_of_a_missing_key(store):
    """Streaming a missing key raises BlobNotFound at the first step."""
    with pytest.raises(BlobNotFound):
        await anext(aiter(store.open_stream(key())))


async def test_stream_20_mb_round_trip_in_bounded_memory(store):
    """20 MB in 1 MiB chunks goes in and out with a traced peak far below the blob's size."""
    k, n = key(), 20
    expected = hashlib.sha256()

    async def upload() -> AsyncIterator[bytes]:
        for i in range(n):
            chunk = pattern(i)
            expected.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        assert await store.put_stream(k, upload()) is True
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        got, size = hashlib.sha256(), 0
        async for chunk in store.open_stream(k):
            assert len(chunk) <= MiB
            got.update(chunk)
            size += len(chunk)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == n * MiB
    assert got.hexdigest() == expected.hexdigest()
    # A few chunks at once at most: the consumer's chunk, the next one arriving, the driver's buffer.
    assert read_peak < 6 * MiB, f"reading 20 MiB peaked at {read_peak / MiB:.1f} MiB"
    assert write_peak < 6 * MiB, f"writing 20 MiB peaked at {write_peak / MiB:.1f} MiB"


async def test_concurrent_puts_of_one_key_leave_one_consistent_blob(store):
    """Two writers racing for a key: exactly one wins and the blob is entirely the winner's bytes."""
    k = key()
    a = [bytes([0xAA]) * MiB, bytes([0xAB]) * MiB, bytes([0xAC]) * 1000]
    b = [bytes([0xBA]) * MiB, bytes([0xBB]) * 1000]
    won_a, won_b = await asyncio.gather(store.put_stream(k, chunks_of(a)), store.put_stream(k, chunks_of(b)))
    assert sorted([won_a, won_b]) == [False, True]
    assert await store.get(k) == b"".join(a if won_a else b)


async def test_concurrent_whole_puts_of_one_key_leave_one_consistent_blob(store):
    """The same race through `put`: one True, and the stored bytes are one writer's entirely."""
    k, a, b = key(), pattern(1, 2 * MiB + 3), pattern(2, MiB)
    results = await asyncio.gather(store.put(k, a), store.put(k, b))
    assert sorted(results) == [False, True]
    assert await store.get(k) == (a if results[0] else b)


async def test_concurrent_small_puts_of_one_key_leave_one_consistent_blob(store):
    """Blobs of one chunk (written in one statement on PostgreSQL) race the same way: one winner."""
    k, a, b = key(), pattern(3, 1000), pattern(4, 2000)
    results = await asyncio.gather(store.put(k, a), store.put_stream(k, chunks_of([b[:7], b[7:]])))
    assert sorted(results) == [False, True]
    assert await store.get(k) == (a if results[0] else b)
    assert await store.put_stream(k, chunks_of([b"late"])) is False
    assert await store.get(k) == (a if results[0] else b)


class DictStore(BlobStore):
    """A store with only the abstract methods: exercises the ABC's streaming fallbacks."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Keep the bytes unless the key is taken."""
        if key in self.blobs:
            return False
        self.blobs[key] = bytes(data)
        return True

    async def get(self, key: str) -> bytes:
        """The bytes, or BlobNotFound."""
        try:
            return self.blobs[key]
        except KeyError:
            raise BlobNotFound(key) from None

    async def delete(self, key: str) -> None:
        """Forget the key."""
        self.blobs.pop(key, None)

    async def exists(self, key: str) -> bool:
        """Whether the key is stored."""
        return key in self.blobs


async def test_abc_fallbacks_stream_through_put_and_get():
    """A store without its own streaming still round-trips put_stream / open_stream."""
    blobs, k = DictStore(), key()
    data = pattern(0, 3 * MiB + 5)
    assert await blobs.put_stream(k, chunks_of([data[:100], data[100:]])) is True
    assert blobs.blobs[k] == data
    chunks = [c async for c in blobs.open_stream(k)]
    assert b"".join(chunks) == data and max(len(c) for c in chunks) <= MiB
    with pytest.raises(BlobNotFound):
        await anext(aiter(blobs.open_stream(key())))


async def test_delete_many_removes_present_keys_and_ignores_missing_ones(store):
    """`delete_many` removes every listed blob; absent keys and an empty list are no error."""
    kept, gone = key(), [key(), key(), key()]
    for k in [kept, *gone]:
        await store.put(k, b"bytes of " + k.encode())
    await store.delete_many([*gone, key()])
    await store.delete_many([])
    for k in gone:
        assert await store.exists(k) is False
    assert await store.get(kept) == b"bytes of " + kept.encode()


@pytest.mark.integration
async def test_postgres_get_refuses_a_blob_whose_chunks_do_not_add_up(postgres_url) -> None:
    """A chunk gone from under a complete blob: `get` (one query) raises BlobCorrupted, not short bytes."""
    from sqlalchemy import delete

    from shared.blobs.postgres import BlobCorrupted, blob_chunk_table

    store = PostgresBlobStore(postgres_url, chunk_size=MiB)
    try:
        k = key()
        data = pattern(0, 2 * MiB + 10)
        await store.put(k, data)
        assert await store.get(k) == data
        async with store.engine.begin() as conn:
            await conn.execute(
                delete(blob_chunk_table).where(blob_chunk_table.c.key == k, blob_chunk_table.c.index == 1)
            )
        with pytest.raises(BlobCorrupted):
            await store.get(k)
    finally:
        await store.close()


async def test_small_puts_at_the_same_time_each_get_their_own_outcome(store: BlobStore) -> None:
    """Many small puts at once (written in groups): each new key created once with its own bytes, a
    key given twice at once created by exactly one put, an existing key left alone."""
    import asyncio

    existing = key()
    assert await store.put(existing, b"first")
    twice = key()
    keys = [key() for _ in range(40)]
    outcomes = await asyncio.gather(
        *(store.put(k, f"blob {i}".encode()) for i, k in enumerate(keys)),
        store.put(existing, b"second"),
        store.put(twice, b"one"),
        store.put(twice, b"two"),
    )
    assert outcomes[:40] == [True] * 40
    assert outcomes[40] is False
    assert sorted(outcomes[41:]) == [False, True]
    assert [await store.get(k) for k in keys] == [f"blob {i}".encode() for i in range(40)]
    assert await store.get(existing) == b"first"
    assert await store.get(twice) in (b"one", b"two")
    assert await store.get_many([keys[0], twice, keys[-1]]) == [b"blob 0", await store.get(twice), b"blob 39"]


@pytest.mark.integration
async def test_postgres_group_that_fails_is_written_blob_by_blob(postgres_url, monkeypatch) -> None:
    """The group statement failing as a whole: every blob of the group is written alone instead."""
    import asyncio

    from sqlalchemy import text

    from shared.blobs import postgres

    monkeypatch.setattr(postgres, "_WRITE_GROUP", text("SELECT no_such_column FROM blob"))
    store = PostgresBlobStore(postgres_url, chunk_size=MiB)
    try:
        keys = [key() for _ in range(10)]
        assert await asyncio.gather(*(store.put(k, k.encode()) for k in keys)) == [True] * 10
        assert await store.get_many(keys) == [k.encode() for k in keys]
    finally:
        await store.close()
