"""The outbox relay: publishes committed outbox rows in order, then deletes them."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, cast
from uuid import UUID

import structlog
from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.bus.base import Bus, Envelope
from shared.bus.memory import InMemoryBus
from shared.db.models import OutboxMessage

log = structlog.get_logger(component="outbox.relay")

HandedRow = tuple[int, Envelope]
"""An outbox row a unit of work committed: its id and the envelope it holds."""


DELETE_AFTER_S = 0.05
"""How long published hand-off rows wait to be deleted (SQLite): a round of workload A publishes a
message every few milliseconds, each deletion a write transaction of its own on the one SQLite file.
A crash in between leaves rows that the next start publishes again, and the inbox drops."""


class OutboxRelay:
    """Moves outbox rows to the bus: handed over by each commit, polling as a fallback.

    A unit of work of this process hands its committed rows over (`RelayWake.hand_off`): the relay
    publishes them in commit order without reading them back, and deletes them afterwards in batches
    (on SQLite; on PostgreSQL it claims them with a `DELETE ... RETURNING` first, see
    `_publish_handed`). The poll pass (every `poll_s`, after a plain `wake()`, and in `drain`)
    publishes what was not handed over: rows of another process, of a process that died between
    commit and publish, of a unit of work without a relay. It skips the rows a unit of work has
    reserved for its hand-off (from just before its commit until the row is deleted), so the normal
    path publishes each row once.

    At-least-once: a crash between publish and delete republishes the row; consumers' inboxes drop
    the duplicates. On PostgreSQL rows are claimed with SKIP LOCKED so relays in several processes
    do not publish the same rows concurrently.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        *,
        poll_s: float = 0.5,
        batch: int = 500,
    ) -> None:
        self._sessions = sessions
        self._bus = bus
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._poll_asked = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._publishing = asyncio.Lock()
        """One publication at a time (the loop's and a caller's `drain`): order, and no row twice."""
        self._handed: deque[HandedRow] = deque()
        """Committed rows handed over, in commit order, waiting to be published."""
        self._reserved: set[UUID] = set()
        """Message ids of handed-over rows (from before their commit to their deletion): polls skip them."""
        self._published: list[HandedRow] = []
        """Handed-over rows published and not yet deleted (SQLite)."""
        self._deleter: asyncio.Task[None] | None = None
        self._handing = False
        """The loop is publishing handed-over rows (a publish that suspends): later ones wait their turn."""
        bind = sessions.kw.get("bind")
        self._postgres: bool | None = None if bind is None else bind.dialect.name == "postgresql"
        self._inline = isinstance(bus, InMemoryBus) and bus.publish_completes_inline
        self.wake = RelayWake(self)
        """Called after a commit (asks for a poll pass); units of work hand their rows over through it."""

    def start(self) -> None:
        """Start the relay loop."""
        self._stopping = False
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

    def _reserve(self, message_ids: Iterable[UUID]) -> bool:
        """Keep polls off these rows, about to commit; False (nothing reserved) when not running."""
        if self._task is None or self._stopping:
            return False
        self._reserved.update(message_ids)
        return True

    def _release(self, message_ids: Iterable[UUID]) -> None:
        """The reserving transaction did not commit: nothing to hand over."""
        self._reserved.difference_update(message_ids)

    def _hand_off(self, rows: Sequence[HandedRow]) -> None:
        """Committed rows (reserved before the commit) to publish next, in this order.

        On the in-memory bus with a SQLite file, and nothing handed over before them still waiting,
        they are published right here, in the committing task: the relay's wake-up would wait its
        turn behind everything else ready on a busy loop (2-6 ms per hop in a round of workload A).
        """
        if self._inline and self._postgres is False and not self._handed and not self._handing:
            try:
                _run_inline(self._bus.publish([envelope for _, envelope in rows]))
            except Exception as exc:
                log.warning("outbox.inline_publish_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                self._published_now(rows)
                return
        self._handed.extend(rows)
        self._wake.set()

    def _published_now(self, rows: Sequence[HandedRow]) -> None:
        """Queue the deletion of published handed-over rows (SQLite)."""
        self._published.extend(rows)
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.create_task(self._delete_later(), name="outbox-delete")

    def _ask_poll(self) -> None:
        self._poll_asked = True
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            timed_out = False
            try:
                async with asyncio.timeout(self._poll_s):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True
            self._wake.clear()
            if self._stopping:
                return
            poll, self._poll_asked = timed_out or self._poll_asked, False
            try:
                async with self._publishing:
                    await self._publish_handed()
                    if poll:
                        await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox.relay_failed", error=f"{type(exc).__name__}: {exc}")

    async def drain(self) -> int:
        """Publish every committed outbox row, delete what was published; return how many were."""
        async with self._publishing:
            total = await self._publish_handed()
            total += await self._poll()
        if self._deleter is not None:
            await self._deleter
        if self._published:  # a deletion that failed in the background: this time the caller sees why
            await self._delete_published(raising=True)
        return total

    async def _publish_handed(self) -> int:
        """Publish the handed-over rows; on failure they stay first in line for the next pass."""
        total = 0
        while self._handed:
            rows = [self._handed.popleft() for _ in range(min(len(self._handed), self._batch))]
            self._handing = True
            try:
                total += await self._publish_rows(rows)
            except BaseException:
                self._handed.extendleft(reversed(rows))
                raise
            finally:
                self._handing = False
        return total

    async def _publish_rows(self, rows: list[HandedRow]) -> int:
        if self._postgres is None:
            async with self._sessions() as session:
                self._postgres = session.get_bind().dialect.name == "postgresql"
        if not self._postgres:
            # One process serves a SQLite file: the reservation alone keeps its polls away, and the
            # deletion (a writer's turn, behind the transactions ahead) need not hold up delivery.
            await self._bus.publish([envelope for _, envelope in rows])
            self._published_now(rows)
            return len(rows)
        async with self._sessions() as session:
            # Another process's relay may have claimed a row since the commit (FOR UPDATE SKIP
            # LOCKED, before the reservation could be seen): the DELETE waits for it, and publishes
            # only what it removed itself. Published, then committed: a crash republishes.
            async with session.begin():
                removed = set(
                    (
                        await session.scalars(
                            delete(OutboxMessage)
                            .where(OutboxMessage.id.in_([row_id for row_id, _ in rows]))
                            .returning(OutboxMessage.message_id)
                        )
                    ).all()
                )
                envelopes = [envelope for _, envelope in rows if envelope.message_id in removed]
                if envelopes:
                    await self._bus.publish(envelopes)
            self._reserved.difference_update(envelope.message_id for _, envelope in rows)
            return len(envelopes)

    async def _delete_later(self) -> None:
        """`_delete_published` after `DELETE_AFTER_S`: the rows published meanwhile go in the same
        statement, and the deletion waits until the round's next hops have had their turn."""
        await asyncio.sleep(DELETE_AFTER_S)
        await self._delete_published()

    async def _delete_published(self, *, raising: bool = False) -> None:
        """Delete the rows published from the hand-off, in batches, until none are left."""
        while self._published:
            rows, self._published = self._published, []
            try:
                async with self._sessions() as session, session.begin():
                    await session.execute(
                        _DELETE_PUBLISHED,
                        [{"row_id": row_id, "message_id": envelope.message_id} for row_id, envelope in rows],
                    )
            except Exception as exc:
                self._published[:0] = rows  # still reserved: deleted on the next try
                if raising:
                    raise
                log.warning("outbox.delete_failed", error=f"{type(exc).__name__}: {exc}")
                return
            # Under the lock: a poll pass that read these rows before the deletion still skips them.
            async with self._publishing:
                self._reserved.difference_update(envelope.message_id for _, envelope in rows)

    async def _poll(self) -> int:
        """Publish every committed row nobody handed over, in id order."""
        total, after = 0, 0
        while True:
            published, after, full = await self._poll_batch(after)
            total += published
            if not full:
                return total

    async def _poll_batch(self, after: int) -> tuple[int, int, bool]:
        async with self._sessions() as session, session.begin():
            query = (
                select(OutboxMessage)
                .where(OutboxMessage.id > after)
                .order_by(OutboxMessage.id)
                .limit(self._batch)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = (await session.scalars(query)).all()
            if not rows:
                return 0, after, False
            # Checked after the read: a row visible to it committed after its reservation.
            mine = [r for r in rows if r.message_id not in self._reserved]
            if mine:
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
                        for r in mine
                    ]
                )
                await session.execute(_DELETE_POLLED, [{"row_id": r.id} for r in mine])
            return len(mine), rows[-1].id, len(rows) == self._batch


_OUTBOX = cast(Table, OutboxMessage.__table__)
_DELETE_POLLED = delete(_OUTBOX).where(_OUTBOX.c.id == bindparam("row_id"))
_DELETE_PUBLISHED = _DELETE_POLLED.where(_OUTBOX.c.message_id == bindparam("message_id"))
"""Outbox rows deleted one per parameter set, run as one executemany of a Core statement (its id,
and for handed-over rows the message id too, in case SQLite gave a deleted row's id to a new one):
the ORM's bulk delete with `IN` lists of a batch's ids cost the embedded server ~3% of its loop at
B 1,000 (the ORM's pre-execution, the lists expanded and converted in Python on every run)."""


def _run_inline(publish: Coroutine[Any, Any, None]) -> None:
    """Run a publish that completes without suspending (`InMemoryBus.publish_completes_inline`) here."""
    try:
        publish.send(None)
    except StopIteration:
        return
    publish.close()
    raise RuntimeError("the bus's publish suspended: publish_completes_inline does not hold")


class RelayWake:
    """`relay.wake`: called after a commit that wrote to the outbox, it asks for a poll pass.

    A unit of work holding it hands its rows over instead: `reserve` before its commit (so no poll
    pass publishes them meanwhile), then `hand_off` right after it, or `release` if it failed.
    """

    def __init__(self, relay: OutboxRelay) -> None:
        self._relay = relay

    def __call__(self) -> None:
        self._relay._ask_poll()

    def reserve(self, message_ids: Iterable[UUID]) -> bool:
        """Reserve rows about to commit; False when the relay is not running (leave them to a poll)."""
        return self._relay._reserve(message_ids)

    def release(self, message_ids: Iterable[UUID]) -> None:
        """Drop a reservation whose transaction did not commit."""
        self._relay._release(message_ids)

    def hand_off(self, rows: Sequence[HandedRow]) -> None:
        """Publish these committed, reserved rows next, in this order."""
        self._relay._hand_off(rows)
