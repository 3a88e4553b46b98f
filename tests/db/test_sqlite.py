"""SQLite in embedded mode: writers take turns in the process (the writer queue) instead of failing or
sleeping on SQLite's lock; statements run on the loop but never block it on a lock.

SQLite's busy timeout is set to 0 in the queue tests, so a writer that reached SQLite's lock while
another one holds it would fail at once with "database is locked": they pass only through the queue.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import create_engine, create_schema, session_factory
from shared.db.models import Principal
from shared.db.sqlite import LoopConnection, WriterQueue
from shared.enums import Role


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A SQLite file database whose busy timeout is 0: contention at SQLite's level fails at once."""
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'q.db'}", sqlite_busy_timeout_s=0)
    await create_schema(eng)
    yield eng
    await eng.dispose()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `condition` holds; fail naming `what` after ten thousand turns."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    pytest.fail(f"timed out waiting for {what}")


def _principal(name: str) -> Principal:
    return Principal(id=uuid4(), name=name, role=Role.CLIENT, token_hash=uuid4().hex)


async def _count(engine: AsyncEngine) -> int:
    async with session_factory(engine)() as session:
        return int(await session.scalar(select(func.count()).select_from(Principal)) or 0)


async def test_a_second_writer_waits_for_the_first_to_commit(engine: AsyncEngine) -> None:
    """Two transactions writing at once both commit; the second waits its turn, then writes."""
    sessions = session_factory(engine)
    first_wrote, release_first = asyncio.Event(), asyncio.Event()
    order: list[str] = []
    queue = WriterQueue.of(engine)
    assert queue is not None

    async def first() -> None:
        async with sessions() as session, session.begin():
            session.add(_principal("first"))
            await session.flush()
            first_wrote.set()
            await release_first.wait()
            order.append("first commits")

    async def second() -> None:
        await first_wrote.wait()
        async with sessions() as session, session.begin():
            session.add(_principal("second"))
            await session.flush()
            order.append("second wrote")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    # Without the queue, the second writer's INSERT would reach SQLite's lock and fail at once.
    await wait_until(lambda: queue.waiting == 1, "the second writer to queue up")
    assert order == []
    release_first.set()
    await asyncio.gather(*tasks)
    assert order == ["first commits", "second wrote"]
    assert await _count(engine) == 2


async def test_a_rollback_frees_the_queue_and_readers_never_wait(engine: AsyncEngine) -> None:
    """A reader reads while a writer holds the queue; a writer that rolls back lets the next one in."""
    sessions = session_factory(engine)
    wrote, release = asyncio.Event(), asyncio.Event()

    async def doomed() -> None:
        async with sessions() as session, session.begin():
            session.add(_principal("doomed"))
            await session.flush()
            wrote.set()
            await release.wait()
            raise RuntimeError("roll me back")

    task = asyncio.create_task(doomed())
    await wrote.wait()
    assert await asyncio.wait_for(_count(engine), timeout=5) == 0, "a read waited for the writer"
    release.set()
    with pytest.raises(RuntimeError, match="roll me back"):
        await task

    async def after() -> None:
        async with sessions() as session, session.begin():
            session.add(_principal("after"))

    # A queue left held would make this writer wait for the queue's 30 s fallback.
    await asyncio.wait_for(after(), timeout=10)
    assert await _count(engine) == 1


async def test_many_concurrent_writers_all_commit(engine: AsyncEngine) -> None:
    """Fifty transactions, each writing across several awaits, all commit with a zero busy timeout."""
    sessions = session_factory(engine)

    async def write(i: int) -> None:
        async with sessions() as session, session.begin():
            session.add(_principal(f"p{i}"))
            await session.flush()
            await asyncio.sleep(0)
            await session.execute(
                text("UPDATE principal SET name = name || '!' WHERE name = :n"), {"n": f"p{i}"}
            )

    await asyncio.gather(*(write(i) for i in range(50)))
    assert await _count(engine) == 50


async def test_a_lock_held_by_another_process_is_waited_for_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write while another connection (another process) holds the lock waits in a thread; the
    loop keeps running meanwhile, and the write commits once the lock is released."""
    path = tmp_path / "busy.db"
    eng = create_engine(f"sqlite+aiosqlite:///{path}", sqlite_busy_timeout_s=30)
    await create_schema(eng)
    waiting_in_thread = threading.Event()
    real_waiting = LoopConnection._waiting

    def noting_waiting(self: LoopConnection, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        waiting_in_thread.set()
        return real_waiting(self, fn, *args, **kwargs)

    monkeypatch.setattr(LoopConnection, "_waiting", noting_waiting)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock as another process would
    try:

        async def write() -> None:
            async with session_factory(eng)() as session, session.begin():
                session.add(_principal("patient"))

        task = asyncio.create_task(write())
        await wait_until(waiting_in_thread.is_set, "the write to wait")
        # This coroutine ran while the write waited: the wait is not on the loop.
        assert threading.current_thread() is threading.main_thread()
        assert not task.done()
        other.execute("COMMIT")
        await asyncio.wait_for(task, timeout=20)
        assert await _count(eng) == 1
    finally:
        other.close()
        await eng.dispose()
