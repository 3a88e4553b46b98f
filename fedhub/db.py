"""The database schema in distributed mode: Alembic migrations applied over fedhub's async engine.

Embedded mode keeps `shared.db.create_schema` on SQLite; a PostgreSQL deployment runs
`fedhub db upgrade` (here `main_upgrade`) before its services start.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection

from shared.db import Base, create_engine

MIGRATIONS = Path(__file__).parent / "migrations"
"""The Alembic script folder: env.py and versions/."""

# Any constant both racing upgraders agree on: the key of the advisory lock that serialises them.
_UPGRADE_LOCK = 0x66656468  # "fedh"

log = structlog.get_logger(component="db")


def target_metadata() -> list[MetaData]:
    """Every table fedhub declares: the shared ones, each service's own, and the blob store's."""
    # Imported here, not at module level: importing them registers their tables on Base.
    import services.aggregator.models
    import services.notifier.models  # noqa: F401
    import shared.db.models  # noqa: F401
    from shared.blobs import postgres

    return [Base.metadata, postgres.metadata]


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config over fedhub's migrations; env.py runs on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` to `revision` in one transaction; a no-op when it is there already.

    On PostgreSQL an advisory lock lets only one process migrate at a time (several pods may start
    together); DDL is transactional there, so a failed migration leaves the schema as it was.
    """
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
            await conn.run_sync(_upgrade, revision)
    finally:
        await engine.dispose()
    log.info("db.upgraded", revision=revision)


def _upgrade(connection: Connection, revision: str) -> None:
    command.upgrade(alembic_config(connection), revision)


def head() -> str | None:
    """The newest revision the migrations define."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current(url: str) -> str | None:
    """The revision the database at `url` is at; None before the first migration."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_current)
    finally:
        await engine.dispose()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_diff(url: str) -> list[Any]:
    """How the database at `url` differs from the models (Alembic autogenerate); empty when in step."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_schema_diff)
    finally:
        await engine.dispose()


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, target_metadata()))  # type: ignore[arg-type]


def main_upgrade() -> None:
    """Migrate the database `FEDHUB_DATABASE_URL` names to the newest revision (`fedhub db upgrade`)."""
    url = os.environ.get("FEDHUB_DATABASE_URL")
    if not url:
        raise SystemExit("FEDHUB_DATABASE_URL is not set: name the database to migrate")
    asyncio.run(upgrade(url))
