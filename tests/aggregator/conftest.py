"""Fixtures of the aggregator tests: an embedded runtime over a temporary SQLite file and blob folder."""

from __future__ import annotations

import pytest

from services.aggregator.settings import AggregatorSettings
from shared.runtime import Runtime


@pytest.fixture
def settings(tmp_path) -> AggregatorSettings:
    """Aggregator settings over tmp_path, on the CPU; the outbox relay runs on commit wake-ups alone."""
    return AggregatorSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        # A poll longer than any test: a prompt publish proves the commit woke the relay.
        outbox_poll_s=60,
        device="cpu",
    )


@pytest.fixture
async def runtime(settings):
    """An open embedded runtime (schema created, in-memory bus), closed after the test."""
    rt = await Runtime.open(settings, create_tables=True)
    yield rt
    await rt.close()
