"""The migrations on SQLite too: a model change without its migration fails even without PostgreSQL."""

from __future__ import annotations

from fedhub import db


async def test_upgrade_on_sqlite_matches_the_models(tmp_path):
    """Upgrading an empty SQLite file reaches head with no difference from the models; twice is harmless."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'migrated.db'}"
    assert await db.current(url) is None
    await db.upgrade(url)
    await db.upgrade(url)
    assert await db.current(url) == db.head()
    assert await db.schema_diff(url) == []
