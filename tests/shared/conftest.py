"""Fixtures of the shared tests: an embedded runtime over a temporary SQLite file and blob folder."""

from __future__ import annotations

import pytest

from shared.runtime import Runtime
from shared.settings import CommonSettings


@pytest.fixture
async def runtime(tmp_path):
    """An open embedded runtime (schema created, in-memory bus), closed after the test."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        # A poll far longer than any wait here: a prompt publish proves the commit woke the relay.
        outbox_poll_s=60,
    )
    rt = await Runtime.open(settings, create_tables=True)
    yield rt
    await rt.close()
