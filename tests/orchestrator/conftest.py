"""Fixtures of the orchestrator's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.runtime import Runtime
from shared.settings import CommonSettings


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """An embedded runtime whose relay is stopped, so emitted messages stay in the outbox to inspect."""
    rt = await Runtime.open(
        CommonSettings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", blob_path=tmp_path / "blobs"
        ),
        create_tables=True,
    )
    await rt.relay.stop()
    yield rt
    await rt.close()
