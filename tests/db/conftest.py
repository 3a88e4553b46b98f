"""Fixtures of the PostgreSQL tests: a runtime over the session's migrated database, blobs in it too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import text

from shared.runtime import Runtime
from shared.settings import CommonSettings

DEADLINE_S = 10.0


@pytest.fixture
async def pg_runtime(postgres_url, tmp_path):
    """An open runtime on PostgreSQL (migrated schema, PostgreSQL blobs, in-memory bus), closed after."""
    settings = CommonSettings(
        database_url=postgres_url,
        blob_backend="postgres",
        blob_path=tmp_path / "unused-blobs",
        # A poll far longer than any wait here: a prompt publish proves the commit woke the relay.
        outbox_poll_s=60,
    )
    rt = await Runtime.open(settings)
    yield rt
    await rt.close()


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll the async `condition` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def lock_waiters(runtime: Runtime) -> int:
    """How many sessions of this database are blocked waiting for a lock."""
    async with runtime.engine.connect() as conn:
        n = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(n or 0)
