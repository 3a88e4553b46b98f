"""The unit of work: one session, one transaction; state, outbox and inbox commit together."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self
from uuid import UUID

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.bus.base import envelope_for
from shared.db.models import InboxMessage, OutboxMessage
from shared.events import Message

log = structlog.get_logger(component="uow")


class UnitOfWork:
    """`async with uow:` opens a transaction that commits on success and rolls back on error.

    Only this boundary commits; code inside calls `flush()` at most. Messages added with `emit`
    are written to the outbox in the same transaction and published by the relay after commit.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], on_commit: Callable[[], None] | None
    ) -> None:
        self._sessions = sessions
        self._on_commit = on_commit
        self._session: AsyncSession | None = None
        self._emitted = 0
        self._unchanged = False
        self._after_commit: list[Callable[[], Awaitable[None] | None]] = []
        self._on_rollback: list[Callable[[], Awaitable[None]]] = []

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory, for work that must see committed state outside this transaction."""
        return self._sessions

    @property
    def session(self) -> AsyncSession:
        """The open session; only valid inside `async with`."""
        if self._session is None:
            raise RuntimeError("UnitOfWork used outside 'async with'")
        return self._session

    async def __aenter__(self) -> Self:
        self._session = self._sessions()
        self._emitted = 0
        self._unchanged = False
        self._after_commit = []
        self._on_rollback = []
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self.session
        undo, self._on_rollback = self._on_rollback, []
        try:
            if exc_type is None:
                await session.commit()
            else:
                await session.rollback()
        except BaseException:
            await _best_effort(undo)
            raise
        finally:
            await session.close()
            self._session = None
        if exc_type is not None:
            await _best_effort(undo)
        else:
            if self._emitted and self._on_commit is not None:
                self._on_commit()
            callbacks, self._after_commit = self._after_commit, []
            for callback in callbacks:
                result = callback()
                if result is not None:
                    await result

    def after_commit(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run `callback` once this transaction has committed (never after a rollback).

        For effects outside the database that must not happen unless the state did: deleting
        blobs, waking in-process listeners. They are best effort: a crash right after commit skips them.
        """
        self._after_commit.append(callback)

    def on_rollback(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` if this transaction does not commit (an error inside, or a failed commit).

        Undoes effects outside the database made before the commit, such as a blob written for a row
        that then never commits: a refused request must leave no bytes behind.
        """
        self._on_rollback.append(callback)

    def changed_nothing(self) -> None:
        """Declare that this unit of work writes nothing (a message that moved nothing along).

        A consumer then records no inbox row for the message it is handling: applying it again
        changes nothing either, so there is nothing to deduplicate, and the transaction stays
        read-only (no write lock, nothing to commit). Emitting a message or leaving ORM changes
        pending overrides the declaration.
        """
        self._unchanged = True

    @property
    def unchanged(self) -> bool:
        """True when `changed_nothing` was declared and nothing was emitted or added since."""
        session = self.session
        return (
            self._unchanged and self._emitted == 0 and not (session.new or session.dirty or session.deleted)
        )

    def emit(
        self, message: Message, *, correlation_id: UUID | None = None, message_id: UUID | None = None
    ) -> UUID:
        """Write `message` to the outbox in this transaction; return its message id."""
        env = envelope_for(message, correlation_id=correlation_id, message_id=message_id)
        self.session.add(
            OutboxMessage(
                message_id=env.message_id,
                type=env.type,
                routing_key=env.routing_key,
                body=env.body,
                correlation_id=env.correlation_id,
            )
        )
        self._emitted += 1
        return env.message_id

    async def claim_inbox(self, consumer: str, message_id: UUID) -> bool:
        """Record `message_id` as applied by `consumer`; False when it already was (a redelivery).

        A concurrent duplicate that slips past the check fails the commit on the primary key, so
        its transaction rolls back and the retry then sees the first one's row.
        """
        seen = await self.session.scalar(
            select(InboxMessage.message_id).where(
                InboxMessage.consumer == consumer, InboxMessage.message_id == message_id
            )
        )
        if seen is not None:
            return False
        self.session.add(InboxMessage(consumer=consumer, message_id=message_id))
        return True


async def _best_effort(callbacks: list[Callable[[], Awaitable[None]]]) -> None:
    for callback in reversed(callbacks):
        try:
            await callback()
        except Exception as exc:  # the original failure is what the caller must see
            log.warning("uow.undo_failed", error=f"{type(exc).__name__}: {exc}")


class UnitOfWorkFactory:
    """Makes units of work over one session factory; `on_commit` wakes the outbox relay."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], on_commit: Callable[[], None] | None = None
    ):
        self.sessions = sessions
        self.on_commit = on_commit

    def __call__(self) -> UnitOfWork:
        return UnitOfWork(self.sessions, self.on_commit)
