"""SQLite for embedded mode: statements on the event loop's thread, writers queued in the process.

Two measures against what a busy embedded round spent its time on:

* `LoopConnection`: aiosqlite hands every call (cursor, execute, fetch, close, commit) to a thread
  of its own and back; on a local file the statement takes microseconds and the two thread
  switches far more (a third of the embedded server's CPU at 100 clients, most of it waking
  threads). Here the calls run inline on the loop. They never block on a lock: in-process
  writers take turns in the `WriterQueue` before they reach SQLite, and the busy timeout on the
  loop is 0, so a lock held by another process (`fedhub db`, a second server on the same file)
  sends the call to the connection's thread, which waits there with the real busy timeout.
* `WriterQueue`: see its docstring.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

log = structlog.get_logger(component="db.sqlite")

POOL_SIZE = 16
"""Connections kept open to a SQLite file: enough that a burst of requests reuses them rather than
opening (and closing) one each."""


def sqlite_engine(url: str, *, busy_timeout_s: float = 30.0, **kwargs: Any) -> AsyncEngine:
    """An async engine over a SQLite file (or memory): WAL, foreign keys, loop connections, the queue."""
    parsed = make_url(url)
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("pool_size", POOL_SIZE)
        kwargs.setdefault("max_overflow", POOL_SIZE)

        async def connect() -> LoopConnection:
            return await LoopConnection.open(database, busy_timeout_s)

        engine = create_async_engine(url, async_creator=connect, **kwargs)
        WriterQueue.of_file(database).install(engine)
    else:
        # One connection holds an in-memory database: no pool to size.
        for option in ("pool_size", "max_overflow", "pool_timeout"):
            kwargs.pop(option, None)
        engine = create_async_engine(url, connect_args={"timeout": busy_timeout_s}, **kwargs)
        WriterQueue().install(engine)

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return engine


class LoopConnection(aiosqlite.Connection):
    """An aiosqlite connection whose calls run on the event loop's thread (see the module doc)."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], busy_timeout_s: float) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)

    @classmethod
    async def open(cls, database: str, busy_timeout_s: float) -> LoopConnection:
        """Connect (in the connection's thread, as aiosqlite does) with no busy wait on the loop."""

        def connector() -> sqlite3.Connection:
            # Used from the loop's thread and, for the rare wait on another process, from its own.
            return sqlite3.connect(database, timeout=0, check_same_thread=False)

        connection = cls(connector, busy_timeout_s)
        await connection
        return connection

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise
        # Another process holds the lock: wait for it in the connection's thread, not on the loop.
        # A call that got SQLITE_BUSY changed nothing, so running it again is safe.
        log.info("sqlite.busy_elsewhere", busy_timeout_ms=self._busy_timeout_ms)
        return await super()._execute(self._waiting, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    def _waiting(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        connection = self._conn
        connection.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        try:
            return fn(*args, **kwargs)
        finally:
            connection.execute("PRAGMA busy_timeout = 0")


WRITER_WAIT_S = 30.0
"""The longest a writer waits for its turn before it goes ahead (as SQLite's busy timeout)."""

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")


class WriterQueue:
    """Writers to a SQLite file take turns in this process, in arrival order, without sleeping.

    SQLite has one writer at a time. A second one gets SQLITE_BUSY and its busy handler sleeps
    (1, 2, 5, ... 100 ms) before it retries, so under contention a write waits much longer than
    the transaction ahead of it lasts (a round with 8 clients spent ~0.5 s per round there), and
    not in arrival order. Here a transaction's first writing statement waits for its turn (a FIFO
    of futures; a free turn is taken without yielding to the loop), which its connection keeps
    until the transaction commits or rolls back and then hands to the next writer. Reads never
    wait (WAL). The busy timeout stays, for writers in other processes.

    The wait happens inside SQLAlchemy's greenlet (`await_only`), where every statement of an
    `AsyncEngine` runs. A statement outside one (no loop to wait on) goes straight to SQLite.
    """

    def __init__(self) -> None:
        self._holder: int | None = None
        """The connection whose transaction is writing (its key), None when the turn is free."""
        self._queue: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    @property
    def waiting(self) -> int:
        """Writers waiting for their turn right now."""
        return sum(not turn.done() for _, turn in self._queue)

    @classmethod
    def of(cls, engine: AsyncEngine) -> WriterQueue | None:
        """The queue installed on `engine` (None: not a SQLite engine)."""
        return _QUEUES.get(engine.sync_engine)

    @classmethod
    def of_file(cls, database: str) -> WriterQueue:
        """The queue of every engine of this process on the file `database`: SQLite's one writer is
        per file, so two engines on one file (the runtime's and the blob store's own pool) take
        turns in one queue instead of meeting as strangers at SQLite's busy handler."""
        path = str(Path(database).resolve())
        queue = _FILE_QUEUES.get(path)
        if queue is None:
            queue = _FILE_QUEUES[path] = cls()
        return queue

    def install(self, engine: AsyncEngine) -> None:
        """Hook the queue into `engine`: before each write statement, after each commit/rollback."""
        sync_engine = engine.sync_engine
        _QUEUES[sync_engine] = self
        event.listen(sync_engine, "before_cursor_execute", self._before_execute)
        dialect = sync_engine.dialect
        # Instance attributes shadow the dialect's methods: the turn passes on once the commit
        # (or rollback, or close) has actually happened, which no engine event reports.
        dialect.do_commit = self._releasing(dialect.do_commit)  # type: ignore[method-assign,assignment]
        dialect.do_rollback = self._releasing(dialect.do_rollback)  # type: ignore[method-assign,assignment]
        dialect.do_close = self._releasing(dialect.do_close)  # type: ignore[method-assign,assignment]
        dialect.do_terminate = self._releasing(dialect.do_terminate)  # type: ignore[method-assign,assignment]

    def _before_execute(self, conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        key = _dbapi_key(conn.connection)
        if key == self._holder or not statement.lstrip()[:7].upper().startswith(_WRITES):
            return
        if not in_greenlet():
            return
        if self._holder is None and not self._queue:
            # The turn is free: take it without yielding to the loop.
            self._holder = key
            return
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        turn: asyncio.Future[None] = loop.create_future()
        self._queue.append((key, turn))
        try:
            # A future, not a coroutine: wait_for makes no task for it.
            await_only(asyncio.wait_for(turn, WRITER_WAIT_S))
        except TimeoutError:
            # Only a holder that never ended its transaction gets here (a leak). Take the turn:
            # SQLite's own lock still keeps two writers apart (the loser waits in its thread).
            log.warning("sqlite.writer_queue_timeout", waited_s=WRITER_WAIT_S, holder=self._holder)
            self._holder = key
        # On a handover `_release` made this connection the holder already.

    def _releasing(self, do: Callable[[Any], None]) -> Callable[[Any], None]:
        def wrapped(dbapi_connection: Any) -> None:
            try:
                do(dbapi_connection)
            finally:
                self._release(_dbapi_key(dbapi_connection))

        return wrapped

    def _release(self, key: int) -> None:
        if key != self._holder:
            return
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            # A connection reset by the garbage collector of another thread: hand over in the loop's.
            self._loop.call_soon_threadsafe(self._release, key)
            return
        while self._queue:
            next_key, turn = self._queue.popleft()
            if not turn.done():  # a waiter that timed out or was cancelled has left
                self._holder = next_key
                turn.set_result(None)
                return
        self._holder = None


_QUEUES: weakref.WeakKeyDictionary[Engine, WriterQueue] = weakref.WeakKeyDictionary()
_FILE_QUEUES: weakref.WeakValueDictionary[str, WriterQueue] = weakref.WeakValueDictionary()
"""Each database file's queue while an engine on it holds it (`WriterQueue.of_file`)."""


def _dbapi_key(connection: Any) -> int:
    """One identity for a pooled connection, whether SQLAlchemy hands us its proxy or the connection."""
    return id(getattr(connection, "dbapi_connection", connection))
