"""The runtime opens the blob store `settings.blob_backend` names, with the configured chunk size."""

from __future__ import annotations

import pytest

from shared.blobs import LocalBlobStore, PostgresBlobStore
from shared.runtime import Runtime
from shared.settings import CommonSettings


async def test_local_backend(tmp_path):
    """The default backend keeps blobs as files under blob_path."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'f.db'}",
        blob_path=tmp_path / "b",
        blob_chunk_size=4096,
    )
    rt = await Runtime.open(settings, create_tables=True)
    try:
        assert isinstance(rt.blobs, LocalBlobStore) and rt.blobs.chunk_size == 4096
        assert await rt.blobs.put("sha256/a", b"x") is True
        assert (tmp_path / "b" / "sha256" / "a").read_bytes() == b"x"
    finally:
        await rt.close()


async def test_postgres_backend_on_sqlite_with_create_tables(tmp_path):
    """Embedded mode with the database backend creates the blob tables itself and stores rows."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'f.db'}",
        blob_backend="postgres",
        blob_path=tmp_path / "b",
    )
    rt = await Runtime.open(settings, create_tables=True)
    try:
        assert isinstance(rt.blobs, PostgresBlobStore) and rt.blobs.engine is not rt.engine  # own pool
        assert await rt.blobs.put("sha256/a", b"x" * 10) is True
        assert await rt.blobs.put("sha256/a", b"y") is False
        assert await rt.blobs.get("sha256/a") == b"x" * 10
        assert not (tmp_path / "b").exists()
    finally:
        await rt.close()


@pytest.mark.integration
async def test_postgres_backend_on_postgres(postgres_url, tmp_path):
    """Distributed mode: the migrated database holds the blobs, through a connection pool of their own."""
    settings = CommonSettings(database_url=postgres_url, blob_backend="postgres", blob_path=tmp_path / "b")
    rt = await Runtime.open(settings)
    try:
        assert isinstance(rt.blobs, PostgresBlobStore) and rt.blobs.engine is not rt.engine  # own pool
        assert await rt.blobs.put("update/u", b"payload") is True
        assert await rt.blobs.exists("update/u") is True
    finally:
        await rt.close()
