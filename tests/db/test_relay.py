"""The outbox relay's hand-off on PostgreSQL: with another process's relay polling the same outbox
all along, every committed row is published exactly once, and in commit order by its own relay."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID, uuid4

from sqlalchemy import func, select

from shared.bus import Envelope, InMemoryBus
from shared.db.models import OutboxMessage
from shared.db.relay import OutboxRelay
from shared.events import UpdateReceived
from tests.db.conftest import wait_until


class CountingBus(InMemoryBus):
    """The in-memory bus, counting every envelope published through it."""

    def __init__(self, counts: Counter[UUID]) -> None:
        super().__init__()
        self.counts = counts

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.counts.update(e.message_id for e in envelopes)
        await super().publish(envelopes)


def update_received() -> UpdateReceived:
    """A sample event."""
    return UpdateReceived(training_id=uuid4(), round=1, client_id=uuid4(), update_id=uuid4(), num_examples=10)


async def test_a_polling_relay_elsewhere_never_doubles_a_handed_row(pg_runtime):
    """Commits hand rows to this process's relay while a second relay drains in a loop: each row once."""
    counts: Counter[UUID] = Counter()
    other = OutboxRelay(pg_runtime.uow.sessions, CountingBus(counts), poll_s=60)
    received: list[Envelope] = []

    async def handle(env: Envelope) -> None:
        received.append(env)

    await pg_runtime.bus.subscribe(f"test-relay-{uuid4().hex}", [UpdateReceived.routing_key], handle)
    pg_runtime.bus.publish = _counting(pg_runtime.bus.publish, counts)  # type: ignore[method-assign]
    stop = asyncio.Event()

    async def poll_elsewhere() -> int:
        total = 0
        while not stop.is_set():
            total += await other.drain()
            await asyncio.sleep(0)
        return total

    poller = asyncio.create_task(poll_elsewhere())
    sent = []
    for n in range(60):
        async with pg_runtime.uow() as uow:
            sent += [uow.emit(update_received()) for _ in range(1 + n % 2)]
    stop.set()
    stolen = await poller

    async def outbox_empty() -> bool:
        async with pg_runtime.uow() as uow:
            return (await uow.session.scalar(select(func.count()).select_from(OutboxMessage)) or 0) == 0

    await wait_until(outbox_empty, "the outbox to empty")
    assert set(counts) == set(sent)
    assert max(counts.values()) == 1, "a row was published twice"
    mine = [e.message_id for e in received]
    assert mine == [m for m in sent if m in set(mine)], "the own relay published out of commit order"
    assert len(mine) + stolen == len(sent)


def _counting(
    publish: Callable[[Sequence[Envelope]], Awaitable[None]], counts: Counter[UUID]
) -> Callable[[Sequence[Envelope]], Awaitable[None]]:
    async def wrapped(envelopes: Sequence[Envelope]) -> None:
        counts.update(e.message_id for e in envelopes)
        await publish(envelopes)

    return wrapped
