"""Reads shared by the callers that need them at the same time, each seeing what it needs to see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


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
