"""PostgreSQL for the integration tests: where it is, throwaway databases, fail-or-skip when it is missing.

`FEDHUB_TEST_POSTGRES_DSN` names a database the tests may connect to and create databases from
(default: the local `test` database, trust auth). Each session works in databases of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import make_url

ADMIN_DSN = os.environ.get("FEDHUB_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a loop of its own, in a thread: fixtures call this whether or not
    a test's event loop is already running."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (PostgreSQL is part of the build there), skip with the reason elsewhere."""
    if os.environ.get("CI", "").lower() in {"true", "1"}:
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(f"PostgreSQL is not reachable at {ADMIN_DSN} ({reason}); set FEDHUB_TEST_POSTGRES_DSN")


def async_url(database: str) -> str:
    """The SQLAlchemy asyncpg URL of `database` on the test server."""
    url = make_url(ADMIN_DSN).set(drivername="postgresql+asyncpg", database=database)
    return url.render_as_string(hide_password=False)


async def create_database() -> str:
    """Create an empty, uniquely named database; return its name."""
    name = f"fedhub_test_{uuid4().hex[:12]}"
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    """Drop `name`, closing whatever connections are still open to it."""
    conn = await asyncpg.connect(ADMIN_DSN, timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def truncate_all(database: str) -> None:
    """Empty every table of `database` but Alembic's version table."""
    dsn = make_url(ADMIN_DSN).set(database=database).render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
