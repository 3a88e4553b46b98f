"""Fakes that subclass the real ports, for tests that need to hold the aggregator mid-job."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shared.blobs import LocalBlobStore


class GatedBlobStore(LocalBlobStore):
    """A local blob store whose reads of `gated` keys wait until `release` is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gated: set[str] = set()
        self.entered = asyncio.Event()
        self.entries = 0
        self.release = asyncio.Event()

    async def get(self, key: str) -> bytes:
        """Read, first waiting at the gate for gated keys."""
        if key in self.gated:
            self.entries += 1
            self.entered.set()
            await self.release.wait()
        return await super().get(key)
