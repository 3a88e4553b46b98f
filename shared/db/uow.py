"""The unit of work: one session, one transaction; state, outbox and inbox commit together."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Protocol, Self, cast, runtime_checkable
from uuid import UUID

import structlog
from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.dml import ReturningInsert

from shared.bus.base import Envelope, envelope_for
from shared.db.base import dialect_insert
from shared.db.models import InboxMessage, OutboxMessage
from shared.events import Message

log = structlog.get_logger(component="uow")


@runtime_checkable
class OutboxHandOff(Protocol):
    """An `on_commit` that takes a unit of work's committed outbox rows (the relay's `wake`)."""

    def __call__(self) -> None: ...

    def reserve(self, message_ids: Iterable[UUID]) -> bool: ...

    def release(self, message_ids: Iterable[UUID]) -> None: ...

    def hand_off(self, rows: Sequence[tuple[int, Envelope]]) -> None: ...


class UnitOfWork:
    """`async with uow:` opens a transaction that commits on success and rolls back on error.

    Only this boundary commits; code inside calls `flush()` at most. Messages added with `emit`
    are written to the outbox in the same transaction and published by the relay after commit:
    when `on_commit` is the relay's hand-off, the rows go to it straight from the commit (in commit
    order, without the relay reading them back); otherwise `on_commit()` wakes it to poll.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], on_commit: Callable[[], None] | None
    ) -> None:
        self._sessions = sessions
        self._on_commit = on_commit
        self._session: AsyncSession | None = None
        self._outbox: list[Envelope] = []
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
        self._outbox = []
        self._unchanged = False
        self._after_commit = []
        self._on_rollback = []
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self.session
        undo, self._on_rollback = self._on_rollback, []
        outbox, self._outbox = self._outbox, []
        handing: OutboxHandOff | None = None
        rows: list[tuple[int, Envelope]] = []
        try:
            if exc_type is None:
                handoff = self._on_commit
                if outbox:
                    rows = await _write_outbox(session, outbox)
                    if isinstance(handoff, OutboxHandOff) and handoff.reserve(
                        envelope.message_id for envelope in outbox
                    ):
                        handing = handoff
                if session.in_transaction():  # nothing begun (no statement, no object): nothing to end
                    await session.commit()
                if handing is not None:
                    # No await between the commit and the hand-off: publication follows commit order.
                    handing.hand_off(rows)
            elif session.in_transaction():
                await session.rollback()
        except BaseException:
            if handing is not None:
                handing.release(envelope.message_id for envelope in outbox)
            await _best_effort(undo)
            raise
        finally:
            self._session = None
            if session.in_transaction() or session.identity_map:
                await session.close()
            # else: no transaction and no object, so no connection to give back nor object to
            # detach: closing would only spend a greenlet hop (~30 us, most units of work here).
        if exc_type is not None:
            await _best_effort(undo)
        else:
            if outbox and self._on_commit is not None and handing is None:
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

    async def end_reads(self) -> None:
        """Commit the (read-only) transaction so far and give its connection back to the pool.

        For a request that next waits on work needing a connection of the same pool (its report's
        group, `services.api.reports`): holding one while it waits, 300 concurrent uploads held
        every connection and their groups could get none. Statements after this begin a new
        transaction in the same session; objects loaded stay usable (no expiry on commit). Refused
        once anything was written or emitted: those commit only at the boundary.
        """
        session = self.session
        if self._outbox or session.new or session.dirty or session.deleted:
            raise RuntimeError("end_reads() after a write: writes commit only when the unit of work ends")
        if session.in_transaction():
            await session.commit()

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
        return self._unchanged and not self._outbox and not (session.new or session.dirty or session.deleted)

    def emit(
        self, message: Message, *, correlation_id: UUID | None = None, message_id: UUID | None = None
    ) -> UUID:
        """Write `message` to the outbox in this transaction; return its message id.

        The rows are inserted just before the commit, all in one statement (not as ORM objects: the
        session's unit of work costs more than the insert itself on a busy server).
        """
        self.session  # noqa: B018 - raises outside `async with`
        env = envelope_for(message, correlation_id=correlation_id, message_id=message_id)
        self._outbox.append(env)
        return env.message_id

    async def claim_inbox(self, consumer: str, message_id: UUID) -> bool:
        """Record `message_id` as applied by `consumer`; False when it already was (a redelivery).

        One statement, an insert that does nothing on the key's conflict: a row inserted now is a
        first delivery. A concurrent duplicate's insert waits for the first one's transaction, then
        finds its row (or, if it rolled back, inserts its own).
        """
        session = self.session
        claim = _inbox_claim(session.get_bind().dialect.name)
        claimed = await session.scalar(claim, {"consumer": consumer, "message_id": message_id})
        return claimed is not None


_INBOX = cast(Table, InboxMessage.__table__)


@functools.cache
def _inbox_claim(dialect: str) -> ReturningInsert[tuple[UUID]]:
    """An inbox row unless its key exists, returning its message id (nothing then); built once per
    dialect (the select and the ORM flush it replaces cost two statements and the unit of work's
    flush)."""
    return dialect_insert(dialect, _INBOX).on_conflict_do_nothing().returning(_INBOX.c.message_id)


_OUTBOX = cast(Table, OutboxMessage.__table__)


async def _write_outbox(session: AsyncSession, envelopes: Sequence[Envelope]) -> list[tuple[int, Envelope]]:
    """Insert the envelopes' outbox rows in one statement; each row's id with its envelope, in order."""
    result = await session.execute(
        insert(_OUTBOX).returning(_OUTBOX.c.id, sort_by_parameter_order=True),
        [
            {
                "message_id": env.message_id,
                "type": env.type,
                "routing_key": env.routing_key,
                "body": env.body,
                "correlation_id": env.correlation_id,
                "created_at": env.created_at,
            }
            for env in envelopes
        ],
    )
    return list(zip(result.scalars().all(), envelopes, strict=True))


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
