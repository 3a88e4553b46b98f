"""Engine and session factory for SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase

from shared.db.sqlite import sqlite_engine


class Base(DeclarativeBase):
    """Declarative base of every fedhub table; services that own a table declare it on this base."""


def create_engine(url: str, *, sqlite_busy_timeout_s: float = 30.0, **kwargs: Any) -> AsyncEngine:
    """An async engine. SQLite (`shared.db.sqlite`): WAL, foreign keys, statements on the event loop,
    writers queued in the process, `sqlite_busy_timeout_s` for writers of other processes.

    PostgreSQL connections are not pinged at checkout (a round trip per checkout: two per upload).
    A connection the server closed (a restart, a failover) fails its next use instead: that
    request answers 5xx and is retried by the client, that message is redelivered, and SQLAlchemy
    then discards every pooled connection of the old server; nothing committed is affected."""
    if make_url(url).get_backend_name() == "sqlite":
        return sqlite_engine(url, busy_timeout_s=sqlite_busy_timeout_s, **kwargs)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_async_engine(url, **kwargs)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Create every table declared on `Base` (embedded mode; distributed mode migrates)."""
    from shared.db import models  # noqa: F401 - registers the shared tables on Base

    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def dialect_insert(dialect: str, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into `table` of the dialect named `dialect` (for `ON CONFLICT`, which each dialect
    builds its own way); `NotImplementedError` for a database fedhub does not support."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"fedhub does not support the {dialect} database")
