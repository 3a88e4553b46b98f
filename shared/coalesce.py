"""Work shared by the callers that need it at the same time: reads (`NextReads`), and items
processed a batch at a time (`Batches`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class NextReads(Generic[T]):
    """A read per key shared by its callers, each caller getting one that *started* after it asked.

    A caller needs a read that sees what committed before it asked (a handler: its own report's
    row; an upload: the round opened before it arrived). Any read started after the call does; one
    already running may not. So a caller joins the read that starts next (never the running one),
    which starts as soon as the running one ends: callers arriving together cost two reads instead
    of one each. `read` runs in a session of the caller's choosing; it must not use the caller's
    own (the first caller may go away while others wait on its read).
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[T]] = {}
        self._next: dict[Hashable, asyncio.Task[T]] = {}

    async def read(self, key: Hashable, query: Callable[[], Awaitable[T]]) -> T:
        """The result of a `query` for `key` that starts after this call."""
        task = self._next.get(key)
        if task is None:
            task = self._next[key] = asyncio.create_task(self._after_running(key, query))
        return await asyncio.shield(task)

    async def _after_running(self, key: Hashable, query: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
        me = self._next.pop(key)
        self._running[key] = me
        try:
            return await query()
        finally:
            if self._running.get(key) is me:
                del self._running[key]


class Batches(Generic[Item, Outcome]):
    """Items processed a batch at a time: every item submitted while a batch is being processed goes
    into the next batch, which starts as soon as that one ends (one round trip or thread hop for all
    the items that arrived together, and none waits for a timer).

    `process` gets a batch and returns one outcome per item, in order: its result, or the exception
    that item alone raises. A caller that stops waiting does not take its item out of its batch.
    """

    def __init__(self, process: Callable[[list[Item]], Awaitable[list[Outcome | Exception]]]) -> None:
        self._process = process
        self._pending: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Outcome:
        """`item`'s outcome once its batch is processed (its own exception raised here)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._task.get_loop() is not loop:
            self._pending, self._task = [], None  # left over from a closed event loop
        outcome: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((item, outcome))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await outcome

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Outcome]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._process([item for item, _ in batch])
                except Exception as exc:  # the batch as a whole failed: each caller learns why
                    results = [exc] * len(batch)
                for (_, outcome), result in zip(batch, results, strict=True):
                    if outcome.done():
                        continue
                    if isinstance(result, Exception):
                        outcome.set_exception(result)
                    else:
                        outcome.set_result(result)
                batch = []
        finally:
            self._task = None
            for _, outcome in [*batch, *self._pending]:
                if not outcome.done():
                    outcome.cancel()
            self._pending = []
