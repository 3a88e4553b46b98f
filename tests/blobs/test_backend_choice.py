"""The runtime opens the blob store `settings.blob_backend` names, with the configured chunk size."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from shared.blobs import LocalBlobStore, PostgresBlobStore, TieredBlobStore
from shared.runtime import Runtime
from shared.settings import CommonSettings


async def test_local_backend_without_rows(tmp_path):
    """The local backend with no row limit keeps every blob as a file under blob_path."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'f.db'}",
        blob_path=tmp_path / "b",
        blob_chunk_size=4096,
        blob_row_max_bytes=0,
    )
    rt = await Runtime.open(settings, create_tables=True)
    try:
        assert isinstance(rt.blobs, LocalBlobStore) and rt.blobs.chunk_size == 4096
        assert await rt.blobs.put("sha256/a", b"x") is True
        assert (tmp_path / "b" / "sha256" / "a").read_bytes() == b"x"
    finally:
        await rt.close()


async def test_local_backend_keeps_small_blobs_as_rows(tmp_path):
    """The default: blobs up to 64 KiB are rows of the database (its own pool), larger ones files."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'f.db'}", blob_path=tmp_path / "b"
    )
    assert settings.blob_row_max_bytes == 64 * 1024
    rt = await Runtime.open(settings, create_tables=True)
    try:
        assert isinstance(rt.blobs, TieredBlobStore) and rt.blobs.rows.engine is not rt.engine
        assert await rt.blobs.put("update/small", b"x" * 64 * 1024) is True
        assert await rt.blobs.put("update/large", b"y" * (64 * 1024 + 1)) is True
        assert not (tmp_path / "b" / "update" / "small").exists()
        assert (tmp_path / "b" / "update" / "large").read_bytes() == b"y" * (64 * 1024 + 1)
        async with rt.engine.connect() as conn:
            assert list(await conn.scalars(text("SELECT key FROM blob"))) == ["update/small"]
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
