"""A blob store in a local folder: atomic writes (temp file + rename), fanned out by key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

from shared.blobs.base import BlobNotFound, BlobStore, check_key


class LocalBlobStore(BlobStore):
    """Blobs as files under `root`; fine for embedded mode and for pods sharing a volume."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes | memoryview) -> bool:
        """Write atomically; an existing key is left untouched."""
        return await asyncio.to_thread(self._put, self._path(key), data)

    @staticmethod
    def _put(path: Path, data: bytes | memoryview) -> bool:
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True

    async def get(self, key: str) -> bytes:
        """Read the whole blob."""
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {key} does not exist") from None

    async def delete(self, key: str) -> None:
        """Unlink the file if present."""
        path = self._path(key)
        await asyncio.to_thread(lambda: path.unlink(missing_ok=True))

    async def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return await asyncio.to_thread(self._path(key).exists)
