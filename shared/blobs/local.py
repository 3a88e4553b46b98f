"""A blob store in a local folder: atomic writes (temp file + link), fanned out by key."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import BinaryIO

from shared.blobs.base import DEFAULT_CHUNK_SIZE, BlobNotFound, BlobStore, check_key, gather_up_to
from shared.coalesce import Batches

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

SMALL_BLOB = 1024 * 1024
"""Streamed blobs up to this size are written in one go (see `LocalBlobStore.put_stream`)."""

GROUPED_BLOB = 64 * 1024
"""Blobs up to this size are written in groups (`shared.coalesce.Batches`): one worker-thread hop
for all the small blobs put at the same time."""


class LocalBlobStore(BlobStore):
    """Blobs as files under `root`; fine for embedded mode and for pods sharing a volume."""

    def __init__(self, root: Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.root = root
        self.chunk_size = chunk_size
        self.root.mkdir(parents=True, exist_ok=True)
        self._groups: Batches[tuple[Path, bytes], bool] = Batches(self._write_group)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Write atomically, off the event loop; an existing key is left untouched.

        Never on the loop, however small: creating a file is a journal update whose latency the
        disk decides (20 us to 0.3 ms for a 600-byte blob on this machine's ext4, more on a network
        volume). A hop to a worker thread costs the loop more than the write's own CPU (150 us of
        a 1 ms upload with 1,000 at once: waking the thread, handing the GIL back and forth), so
        blobs up to `GROUPED_BLOB` bytes put at the same time share one hop (`_write_group`)."""
        path = self._path(key)
        if len(data) <= GROUPED_BLOB:
            return await self._groups.submit((path, bytes(data)))
        return await asyncio.to_thread(self._put, path, data)

    @classmethod
    def _put(cls, path: Path, data: bytes | memoryview) -> bool:
        if path.exists():
            return False
        f, tmp = cls._open_temp(path)
        try:
            with f:
                f.write(data)
        except BaseException:
            _unlink(tmp)
            raise
        return _publish(tmp, path)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes]) -> bool:
        """Write the chunks to a temporary file as they come, then publish it atomically.

        A blob that ends within `SMALL_BLOB` bytes is gathered in memory and written in one call
        off the loop (one thread hop instead of one per step: most updates are small).
        """
        path = self._path(key)
        whole, stream = await gather_up_to(chunks, SMALL_BLOB)
        if whole is not None:
            if len(whole) <= GROUPED_BLOB:
                return await self._groups.submit((path, whole))
            return await asyncio.to_thread(self._put, path, whole)
        if await asyncio.to_thread(path.exists):
            return False
        f, tmp = await asyncio.to_thread(self._open_temp, path)
        try:
            with f:
                async for chunk in stream:
                    await asyncio.to_thread(f.write, chunk)
        except BaseException:
            await asyncio.to_thread(_unlink, tmp)
            raise
        return await asyncio.to_thread(_publish, tmp, path)

    async def _write_group(self, files: list[tuple[Path, bytes]]) -> list[bool | Exception]:
        """Small files put at the same time, written in one worker-thread hop; each its own outcome."""
        return await asyncio.to_thread(self._write_all, files)

    @classmethod
    def _write_all(cls, files: list[tuple[Path, bytes]]) -> list[bool | Exception]:
        out: list[bool | Exception] = []
        for path, data in files:
            try:
                out.append(cls._put(path, data))
            except Exception as exc:
                out.append(exc)
        return out

    @staticmethod
    def _open_temp(path: Path) -> tuple[BinaryIO, str]:
        """A new file beside `path` under a random name, created exclusively (as `mkstemp` does,
        without its per-call name generator and directory lookups); the folder is made on first use."""
        tmp = f"{path.parent}{os.sep}.tmp-{secrets.token_hex(10)}"
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, _TEMP_FLAGS, 0o600)
        return os.fdopen(fd, "wb"), tmp

    async def get(self, key: str) -> bytes:
        """Read the whole blob."""
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} does not exist") from None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Every blob read in one thread hop; None for a missing key or one the store refuses."""
        return await asyncio.to_thread(self._read_all, keys)

    def _read_all(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self._path(key).read_bytes())
            except (FileNotFoundError, ValueError):
                out.append(None)
        return out

    async def open_stream(self, key: str) -> AsyncIterator[bytes]:
        """Read the file `chunk_size` bytes at a time, off the event loop."""
        path = self._path(key)
        try:
            f = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} does not exist") from None
        try:
            while chunk := await asyncio.to_thread(f.read, self.chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(f.close)

    async def delete(self, key: str) -> None:
        """Unlink the file if present."""
        path = self._path(key)
        await asyncio.to_thread(lambda: path.unlink(missing_ok=True))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Unlink every file in one call off the loop; every key is tried, the first error raised after."""
        paths = [self._path(key) for key in keys]
        await asyncio.to_thread(_unlink_all, paths)

    async def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return await asyncio.to_thread(self._path(key).exists)


def _publish(tmp: str, path: Path) -> bool:
    """Give the finished temporary file its final name unless another writer got there first.

    A hard link fails when the name exists, so of two concurrent writers exactly one wins and the
    published file is always complete; `os.replace` would let the second silently overwrite the first.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # A filesystem without hard links: rename, accepting that a racing writer may replace an
        # equally complete file.
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        _unlink(tmp)
    return True


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


def _unlink_all(paths: Sequence[Path]) -> None:
    failure: OSError | None = None
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def _unlink(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
