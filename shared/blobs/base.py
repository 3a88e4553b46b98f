"""The blob store port and the key scheme."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from uuid import UUID

from shared.errors import NotFound

_KEY = re.compile(r"^[a-z0-9]+/[A-Za-z0-9._-]+$")

DEFAULT_CHUNK_SIZE = 1024 * 1024
"""Bytes per chunk a store streams (1 MiB): what one read or write holds in memory at once."""


def content_key(data: bytes | memoryview) -> tuple[str, str]:
    """Content address of `data`: returns (key, sha256 hex digest)."""
    digest = hashlib.sha256(data).hexdigest()
    return f"sha256/{digest}", digest


def update_key(update_id: UUID) -> str:
    """Key of one client update: per update, so deleting it never touches another's bytes."""
    return f"update/{update_id}"


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's namespace."""
    if not _KEY.match(key):
        raise ValueError(f"invalid blob key {key!r}")
    return key


async def gather_up_to(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes | None, AsyncIterator[bytes]]:
    """Read `chunks` until more than `limit` bytes came or they ended.

    Within `limit`: (the whole blob, nothing more to read). Beyond it: (None, a stream of every
    chunk, the ones read here first, then the rest as they come), so that a store can write a
    small blob in one go and stream a large one."""
    head: list[bytes] = []
    size = 0
    async for chunk in chunks:
        head.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    else:
        return b"".join(head), _nothing()

    async def everything() -> AsyncIterator[bytes]:
        for chunk in head:
            yield chunk
        head.clear()
        async for chunk in chunks:
            yield chunk

    return None, everything()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


class BlobNotFound(NotFound):
    """A blob key has no bytes behind it."""


class BlobStore(ABC):
    """Stores immutable byte blobs under keys."""

    @abstractmethod
    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Store `data` under `key` atomically; return False when the key already existed."""

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """Return the bytes under `key`; raise `BlobNotFound` when there are none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether `key` has bytes."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes under each key, in order; None for a key with none (or one the store refuses).

        This fallback reads them one by one; stores override it to read them in one go.
        """
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(await self.get(key))
            except (BlobNotFound, ValueError):
                out.append(None)
        return out

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Remove every key (missing ones are not an error); stores override it to do it in one go."""
        for key in keys:
            await self.delete(key)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> bool:
        """Store the concatenated `chunks` under `key` atomically; False when the key already existed.

        This fallback gathers the whole blob in memory; stores that can write in chunks override it.
        """
        buffer = bytearray()
        async for chunk in chunks:
            buffer += chunk
        return await self.put(key, bytes(buffer))

    async def open_stream(self, key: str) -> AsyncIterator[bytes]:
        """Yield the bytes under `key` in chunks; raise `BlobNotFound` (on the first step) when none.

        This fallback reads the whole blob first; stores that can read in chunks override it.
        """
        data = await self.get(key)
        for start in range(0, len(data), DEFAULT_CHUNK_SIZE):
            yield data[start : start + DEFAULT_CHUNK_SIZE]

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release resources."""
