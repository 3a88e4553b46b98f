"""The local blob store with its small blobs in the database: rows up to a size, files above it.

A file per blob made every client update of a round a file created, linked, read and unlinked
again. On this machine's ext4 the kernel's inode allocation, which skips recently deleted inodes,
grew to the largest single cost of an embedded round at 1,000 clients: two worker threads spent
~0.5 s of kernel time per round on it, more than the event loop's own CPU. Small blobs (a round's
updates, most models of a demo) are now rows of the database the process already writes (the
`blob` tables of `shared.blobs.postgres`, written a group at a time: one transaction for the
updates arriving together); large ones (a real model's weights) stay files, streamed in bounded
memory and kept out of the database file.

The tier of a blob follows from its size (`max_row_bytes`), so a key is in one tier only, unless
the limit changed since it was written (then in either: reads look in the rows first, deletes
clear both). Everything the `BlobStore` contract promises holds for the pair.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from shared.blobs.base import BlobNotFound, BlobStore, gather_up_to
from shared.blobs.local import LocalBlobStore
from shared.blobs.postgres import PostgresBlobStore


class TieredBlobStore(BlobStore):
    """Blobs of at most `max_row_bytes` bytes in `rows`, the others in `files`."""

    def __init__(self, rows: PostgresBlobStore, files: LocalBlobStore, *, max_row_bytes: int) -> None:
        if max_row_bytes <= 0:
            raise ValueError("max_row_bytes must be positive (without rows, use the files alone)")
        self.rows = rows
        self.files = files
        self.max_row_bytes = max_row_bytes
        self.chunk_size = files.chunk_size

    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Store in the tier of `data`'s size; False (and no write) when the key exists there."""
        if len(memoryview(data).cast("B")) <= self.max_row_bytes:
            return await self.rows.put(key, data)
        return await self.files.put(key, data)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> bool:
        """Gather up to `max_row_bytes`: a blob that ends within them is a row, a longer one streams
        to a file (the gathered head first)."""
        whole, stream = await gather_up_to(chunks, self.max_row_bytes)
        if whole is not None:
            return await self.rows.put(key, whole)
        return await self.files.put_stream(key, stream)

    async def get(self, key: str) -> bytes:
        """The whole blob, from the rows or else the files."""
        try:
            return await self.rows.get(key)
        except BlobNotFound:
            return await self.files.get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Every blob in order (the rows in one query, the rest from the files); None for a missing
        or refused key."""
        found = await self.rows.get_many(keys)
        missing = [i for i, data in enumerate(found) if data is None]
        if missing:
            for i, data in zip(missing, await self.files.get_many([keys[i] for i in missing]), strict=True):
                found[i] = data
        return found

    async def open_stream(self, key: str) -> AsyncIterator[bytes]:
        """The blob's chunks, from the tier that holds it."""
        store: BlobStore = self.rows if await self.rows.exists(key) else self.files
        async for chunk in store.open_stream(key):
            yield chunk

    async def delete(self, key: str) -> None:
        """Remove the blob from both tiers; a missing key is not an error."""
        await self.rows.delete(key)
        await self.files.delete(key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the blobs from both tiers (one transaction, one thread hop)."""
        await self.rows.delete_many(keys)
        await self.files.delete_many(keys)

    async def exists(self, key: str) -> bool:
        """Whether either tier holds the blob."""
        return await self.rows.exists(key) or await self.files.exists(key)

    async def close(self) -> None:
        """Close both tiers."""
        await self.rows.close()
        await self.files.close()
