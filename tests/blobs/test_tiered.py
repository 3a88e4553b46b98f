"""The local store with small blobs as rows (`TieredBlobStore`): which tier a blob goes to, reads
and deletes across both, the rows written a group per transaction, one writer queue per file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import event, text

from shared.blobs import LocalBlobStore, PostgresBlobStore, TieredBlobStore
from shared.db.base import create_engine
from shared.db.sqlite import WriterQueue

LIMIT = 1000


@pytest.fixture
async def tiered(tmp_path: Path) -> AsyncIterator[TieredBlobStore]:
    rows = PostgresBlobStore(f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}", chunk_size=256)
    await rows.create_tables()
    store = TieredBlobStore(rows, LocalBlobStore(tmp_path / "blobs", chunk_size=256), max_row_bytes=LIMIT)
    yield store
    await store.close()


async def _row_keys(store: TieredBlobStore) -> set[str]:
    async with store.rows.engine.connect() as conn:
        return {row[0] for row in await conn.execute(text("SELECT key FROM blob"))}


def _file_keys(store: TieredBlobStore) -> set[str]:
    root = store.files.root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def _pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


async def test_a_blob_goes_to_the_tier_of_its_size_put_whole_or_streamed(tiered: TieredBlobStore) -> None:
    """Up to the limit a row, one byte more a file; the same whether put whole or streamed."""
    at, above, streamed_at, streamed_above = (f"update/{uuid4()}" for _ in range(4))
    assert await tiered.put(at, b"a" * LIMIT)
    assert await tiered.put(above, b"b" * (LIMIT + 1))
    assert await tiered.put_stream(streamed_at, _pieces(b"c" * LIMIT, 300))
    assert await tiered.put_stream(streamed_above, _pieces(b"d" * (LIMIT + 1), 300))
    assert await _row_keys(tiered) == {at, streamed_at}
    assert _file_keys(tiered) == {above, streamed_above}
    assert await tiered.get(above) == b"b" * (LIMIT + 1)
    assert b"".join([c async for c in tiered.open_stream(streamed_above)]) == b"d" * (LIMIT + 1)
    assert b"".join([c async for c in tiered.open_stream(at)]) == b"a" * LIMIT
    assert await tiered.get_many([above, "update/missing", at, streamed_above]) == [
        b"b" * (LIMIT + 1),
        None,
        b"a" * LIMIT,
        b"d" * (LIMIT + 1),
    ]
    # An existing key, whatever the tier, is left alone.
    assert await tiered.put(at, b"x") is False
    assert await tiered.put_stream(above, _pieces(b"y" * (LIMIT + 1), 300)) is False


async def test_a_key_in_both_tiers_reads_from_the_rows_and_deletes_from_both(tiered: TieredBlobStore) -> None:
    """A limit changed between two writes of one key can leave it in both tiers: the row answers,
    a delete removes both, a delete of many too."""
    one, two = f"sha256/{uuid4().hex}", f"sha256/{uuid4().hex}"
    for key in (one, two):
        assert await tiered.files.put(key, b"as a file")
        assert await tiered.rows.put(key, b"as a row")
    assert await tiered.get(one) == b"as a row"
    await tiered.delete(one)
    assert not await tiered.exists(one)
    assert await tiered.exists(two)
    await tiered.delete_many([two, "update/never-there"])
    assert not await tiered.exists(two)
    assert await _row_keys(tiered) == set() and _file_keys(tiered) == set()


async def test_small_blobs_put_together_are_written_in_few_transactions(tiered: TieredBlobStore) -> None:
    """30 updates put at once on SQLite: far fewer commits than blobs (one turn of the writer each)."""
    commits: list[int] = []
    event.listen(tiered.rows.engine.sync_engine, "commit", lambda conn: commits.append(1))
    keys = [f"update/{uuid4()}" for _ in range(30)]
    assert await asyncio.gather(*(tiered.put(k, k.encode()) for k in keys)) == [True] * 30
    assert 1 <= len(commits) <= 3
    assert await tiered.get_many(keys) == [k.encode() for k in keys]


def test_a_row_limit_must_be_positive(tmp_path: Path) -> None:
    rows = PostgresBlobStore(f"sqlite+aiosqlite:///{tmp_path / 'f.db'}")
    with pytest.raises(ValueError, match="positive"):
        TieredBlobStore(rows, LocalBlobStore(tmp_path / "b"), max_row_bytes=0)


async def test_engines_on_one_sqlite_file_share_one_writer_queue(tmp_path: Path) -> None:
    """The runtime's engine and the blob store's own pool on one file take turns in one queue; an
    engine on another file has its own."""
    first = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}")
    second = create_engine(f"sqlite+aiosqlite:///{tmp_path / '.' / 'one.db'}")
    other = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'two.db'}")
    try:
        queue = WriterQueue.of(first)
        assert queue is not None
        assert WriterQueue.of(second) is queue
        assert WriterQueue.of(other) not in (None, queue)
    finally:
        for engine in (first, second, other):
            await engine.dispose()
