"""Engine and session factory for SQLite (embedded) and PostgreSQL (distributed)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

log = structlog.get_logger(component="db")


class Base(DeclarativeBase):
    """Declarative base of every fedhub table; services that own a table declare it on this base."""


SQLITE_POOL_SIZE = 16
"""Connections kept open to a SQLite file (each is a thread in aiosqlite): enough that a busy round
does not open and close connections for every burst of requests."""


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine; SQLite gets WAL, foreign keys, a busy timeout and an in-process writer queue."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs.setdefault("pool_size", SQLITE_POOL_SIZE)
            kwargs.setdefault("max_overflow", SQLITE_POOL_SIZE)
        connect_args = {"timeout": 30, **kwargs.pop("connect_args", {})}
        engine = create_async_engine(url, connect_args=connect_args, **kwargs)
        WriterQueue().install(engine)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_async_engine(url, pool_pre_ping=True, **kwargs)


WRITER_WAIT_S = 30.0
"""The longest a writer waits for its turn before it goes ahead (as SQLite's busy timeout)."""

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")


class WriterQueue:
    """Writers to a SQLite file take turns in this process, in arrival order, without sleeping.

    SQLite has one writer at a time. A second one gets SQLITE_BUSY and its busy handler sleeps
    (1, 2, 5, ... 100 ms) before it retries, so under contention a write waits much longer than
    the transaction ahead of it lasts (a round with 8 clients spent ~0.5 s per round there), and
    not in arrival order. Here a transaction's first writing statement waits on an asyncio lock
    instead, which its connection holds until the transaction commits or rolls back; the next
    writer starts the moment it is free. Reads never wait (WAL). The busy timeout stays, for
    writers in other processes (`fedhub db`, a second server on the same file).

    The wait happens inside SQLAlchemy's greenlet (`await_only`), where every statement of an
    `AsyncEngine` runs. A statement outside one (no loop to wait on) goes straight to SQLite.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._holders: set[int] = set()
        self.waiting = 0
        """Writers waiting for their turn right now."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    @classmethod
    def of(cls, engine: AsyncEngine) -> WriterQueue | None:
        """The queue installed on `engine` (None: not a SQLite engine)."""
        return _QUEUES.get(engine.sync_engine)

    def install(self, engine: AsyncEngine) -> None:
        """Hook the queue into `engine`: before each write statement, after each commit/rollback."""
        sync_engine = engine.sync_engine
        _QUEUES[sync_engine] = self
        event.listen(sync_engine, "before_cursor_execute", self._before_execute)
        dialect = sync_engine.dialect
        # Instance attributes shadow the dialect's methods: the lock is released once the commit
        # (or rollback, or close) has actually happened, which no engine event reports.
        dialect.do_commit = self._releasing(dialect.do_commit)  # type: ignore[method-assign,assignment]
        dialect.do_rollback = self._releasing(dialect.do_rollback)  # type: ignore[method-assign,assignment]
        dialect.do_close = self._releasing(dialect.do_close)  # type: ignore[method-assign,assignment]
        dialect.do_terminate = self._releasing(dialect.do_terminate)  # type: ignore[method-assign,assignment]

    def _before_execute(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        key = _dbapi_key(conn.connection)
        if key in self._holders or not statement.lstrip()[:7].upper().startswith(_WRITES):
            return
        if not in_greenlet():
            return
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        self.waiting += 1
        try:
            await_only(asyncio.wait_for(self._lock.acquire(), WRITER_WAIT_S))
        except TimeoutError:
            # Only a holder that never ended its transaction gets here; SQLite's own lock still
            # keeps writes apart, so go on without the queue rather than stall every writer.
            log.warning("sqlite.writer_queue_timeout", waited_s=WRITER_WAIT_S)
            return
        finally:
            self.waiting -= 1
        self._holders.add(key)

    def _releasing(self, do: Callable[[Any], None]) -> Callable[[Any], None]:
        def wrapped(dbapi_connection: Any) -> None:
            try:
                do(dbapi_connection)
            finally:
                self._release(_dbapi_key(dbapi_connection))

        return wrapped

    def _release(self, key: int) -> None:
        if key not in self._holders:
            return
        self._holders.discard(key)
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self._lock.release()
        else:
            # A connection reset by the garbage collector of another thread: release in the loop's.
            loop.call_soon_threadsafe(self._lock.release)


_QUEUES: weakref.WeakKeyDictionary[Engine, WriterQueue] = weakref.WeakKeyDictionary()


def _dbapi_key(connection: Any) -> int:
    """One identity for a pooled connection, whether SQLAlchemy hands us its proxy or the connection."""
    return id(getattr(connection, "dbapi_connection", connection))


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def create_schema(engine: AsyncEngine) -> None:
    """Create every table declared on `Base` (embedded mode; distributed mode migrates)."""
    from shared.db import models  # noqa: F401 - registers the shared tables on Base

    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
