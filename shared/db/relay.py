"""The outbox relay: publishes committed outbox rows in order, then deletes them."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.bus.base import Bus, Envelope
from shared.db.models import OutboxMessage

log = structlog.get_logger(component="outbox.relay")


class OutboxRelay:
    """Moves outbox rows to the bus: woken after each commit, polling as a fallback.

    At-least-once: a crash between publish and delete republishes the batch; consumers' inboxes
    drop the duplicates. On PostgreSQL rows are claimed with SKIP LOCKED so relays in several
    processes do not publish the same rows concurrently.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], bus: Bus, *, poll_s: float = 0.5, batch: int = 500
    ) -> None:
        self._sessions = sessions
        self._bus = bus
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        """Ask for a publish pass now (called after every commit that wrote to the outbox)."""
        self._wake.set()

    def start(self) -> None:
        """Start the relay loop."""
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        """Let the current pass finish, publish what is committed, then stop.

        No cancellation: on Python 3.11 `asyncio.wait_for` can swallow a cancel that lands as the
        wake-up completes, leaving the loop running; and a cancel mid-pass would cut its transaction.
        """
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        await self.drain()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}")

    async def drain(self) -> int:
        """Publish every committed outbox row; return how many were published."""
        total = 0
        while True:
            published = await self._publish_batch()
            total += published
            if published < self._batch:
                return total

    async def _publish_batch(self) -> int:
        async with self._sessions() as session, session.begin():
            query = select(OutboxMessage).order_by(OutboxMessage.id).limit(self._batch)
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = (await session.scalars(query)).all()
            if not rows:
                return 0
            await self._bus.publish(
                [
                    Envelope(
                        message_id=r.message_id,
                        type=r.type,
                        routing_key=r.routing_key,
                        body=r.body,
                        correlation_id=r.correlation_id,
                        created_at=r.created_at,
                    )
                    for r in rows
                ]
            )
            await session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_([r.id for r in rows])))
            return len(rows)
