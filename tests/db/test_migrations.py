"""Migrations: `upgrade` builds exactly the schema the models declare, and is safe to repeat or race."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import inspect

from fedhub import db
from shared.blobs import PostgresBlobStore
from shared.db import create_engine

pytestmark = pytest.mark.integration


def table_names() -> set[str]:
    """Every table the models and the blob store declare."""
    return {t for metadata in db.target_metadata() for t in metadata.tables}


async def tables_in(url: str) -> set[str]:
    """The tables present in the database at `url`."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_builds_the_schema_of_the_models(fresh_postgres_url):
    """From empty to head: every declared table exists and autogenerate finds no difference."""
    assert await db.current(fresh_postgres_url) is None
    await db.upgrade(fresh_postgres_url)
    assert await db.current(fresh_postgres_url) == db.head()
    assert await tables_in(fresh_postgres_url) == table_names() | {"alembic_version"}
    # A model change without its migration shows up here as a difference and fails this test.
    assert await db.schema_diff(fresh_postgres_url) == []


async def test_schema_diff_sees_what_is_missing(fresh_postgres_url):
    """On an empty database the comparison reports every table as missing: it is not vacuous."""
    diff = await db.schema_diff(fresh_postgres_url)
    added = {d[1].name for d in diff if isinstance(d, tuple) and d[0] == "add_table"}
    assert added == table_names()


async def test_upgrade_is_idempotent(fresh_postgres_url):
    """A second upgrade changes nothing and fails on nothing."""
    await db.upgrade(fresh_postgres_url)
    await db.upgrade(fresh_postgres_url)
    assert await db.current(fresh_postgres_url) == db.head()
    assert await db.schema_diff(fresh_postgres_url) == []


async def test_concurrent_upgrades_serialise(fresh_postgres_url):
    """Several processes starting together may all upgrade: the advisory lock lets one migrate."""
    await asyncio.gather(*(db.upgrade(fresh_postgres_url) for _ in range(3)))
    assert await db.current(fresh_postgres_url) == db.head()


async def test_main_upgrade_reads_the_environment(fresh_postgres_url, monkeypatch):
    """`main_upgrade` (the CLI's `fedhub db upgrade`) migrates the database FEDHUB_DATABASE_URL names."""
    monkeypatch.setenv("FEDHUB_DATABASE_URL", fresh_postgres_url)
    await asyncio.to_thread(db.main_upgrade)
    assert await db.current(fresh_postgres_url) == db.head()


def test_main_upgrade_without_a_url_exits(monkeypatch):
    """Without FEDHUB_DATABASE_URL the command refuses with a message rather than guessing."""
    monkeypatch.delenv("FEDHUB_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit, match="FEDHUB_DATABASE_URL"):
        db.main_upgrade()


async def test_migrated_blob_tables_serve_the_blob_store(fresh_postgres_url):
    """The blob store works on the migrated tables, without creating its own."""
    await db.upgrade(fresh_postgres_url)
    store = PostgresBlobStore(fresh_postgres_url)
    try:
        assert await store.put("sha256/abc", b"bytes") is True
        assert await store.get("sha256/abc") == b"bytes"
    finally:
        await store.close()
