"""The outbox relay's hand-off (SQLite): committed rows go to the bus in commit order, once, and a
poll pass never republishes a handed-over row; rows no running relay took stay for the next one."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from uuid import UUID, uuid4

from sqlalchemy import func, select

from shared.bus import Envelope, InMemoryBus
from shared.db.models import InboxMessage, OutboxMessage
from shared.db.relay import OutboxRelay
from shared.events import UpdateReceived
from shared.runtime import Runtime
from shared.settings import CommonSettings
from tests.shared.test_uow import listen, update_received, wait_until


async def outbox_rows(runtime: Runtime) -> int:
    """Rows waiting in the outbox."""
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


class GatedBus(InMemoryBus):
    """The in-memory bus, counting every envelope published; a publish waits while `gate` is clear."""

    publish_completes_inline = False

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()
        self.published: Counter[object] = Counter()

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        self.published.update(e.message_id for e in envelopes)
        self.waiting.set()
        await self.gate.wait()
        await super().publish(envelopes)


@contextlib.asynccontextmanager
async def relay_runtime(tmp_path: Path, bus: InMemoryBus) -> AsyncIterator[Runtime]:
    """A SQLite runtime over `bus` whose relay never polls on its own (a poll pass only by `drain`)."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        outbox_poll_s=60,
    )
    runtime = await Runtime.open(settings, bus=bus, create_tables=True)
    try:
        yield runtime
    finally:
        await runtime.close()


async def held_in_publish(runtime: Runtime, bus: GatedBus) -> UUID:
    """Commit one message with `bus`'s gate closed; its id, once its hand-off is publishing (held)."""
    bus.gate.clear()
    async with runtime.uow() as uow:
        message_id = uow.emit(update_received())
    await asyncio.wait_for(bus.waiting.wait(), 10)
    return message_id


async def test_committed_rows_are_published_in_commit_order(runtime):
    """Units of work committed one after another reach a consumer in that order, with no poll pass."""
    received = await listen(runtime, UpdateReceived.routing_key)
    sent = []
    for n in range(20):
        async with runtime.uow() as uow:
            sent += [uow.emit(update_received()) for _ in range(1 + n % 3)]
    await wait_until(lambda: len(received) == len(sent), "every message")
    assert [e.message_id for e in received] == sent
    deadline = asyncio.get_running_loop().time() + 10
    while await outbox_rows(runtime):
        assert asyncio.get_running_loop().time() < deadline, "published rows stayed in the outbox"
        await asyncio.sleep(0.005)


async def test_a_poll_skips_a_handed_row_published_but_not_yet_deleted(tmp_path):
    """While a handed-over row's deletion waits for the writer's turn, a drain reads it and skips it."""
    bus = GatedBus()
    async with relay_runtime(tmp_path, bus) as runtime:
        message_id = await held_in_publish(runtime, bus)
        # Hold the writer's turn, so the deletion that follows the publish has to wait.
        holder = runtime.uow.sessions()
        holder.add(InboxMessage(consumer="test-holder", message_id=uuid4()))
        await holder.flush()
        bus.gate.set()
        drain = asyncio.create_task(runtime.relay.drain())
        for _ in range(50):
            await asyncio.sleep(0)
        assert await outbox_rows(runtime) == 1, "the row outlives its publication until deleted"
        await holder.rollback()
        await holder.close()
        assert await asyncio.wait_for(drain, 10) == 0, "the drain republished a handed-over row"
        assert bus.published[message_id] == 1
        assert await outbox_rows(runtime) == 0


async def test_rows_committed_without_a_running_relay_stay_for_the_next(runtime):
    """After `stop`, a commit hands nothing over: its row stays, and a new relay publishes it once."""
    await runtime.relay.stop()
    async with runtime.uow() as uow:
        message_id = uow.emit(update_received())
    assert await outbox_rows(runtime) == 1
    bus = GatedBus()
    successor = OutboxRelay(runtime.uow.sessions, bus, poll_s=60)
    received = await listen_on(bus)
    assert await successor.drain() == 1
    await wait_until(lambda: bool(received), "the left-over message")
    assert [e.message_id for e in received] == [message_id]
    assert await outbox_rows(runtime) == 0


async def test_a_failed_commit_releases_its_reservation(runtime):
    """A unit of work that fails to write its row hands nothing over; the relay goes on in order."""
    received = await listen(runtime, UpdateReceived.routing_key)
    duplicate = uuid4()
    async with runtime.uow() as uow:
        uow.emit(update_received(), message_id=duplicate)
    failed = False
    try:
        async with runtime.uow() as uow:
            uow.emit(update_received(), message_id=duplicate)  # the outbox's message_id is unique
    except Exception:
        failed = True
    assert failed
    async with runtime.uow() as uow:
        fence = uow.emit(update_received())
    await wait_until(lambda: len(received) == 2, "the first message and the fence")
    assert [e.message_id for e in received] == [duplicate, fence]


async def listen_on(bus: InMemoryBus) -> list[Envelope]:
    """Bind a fresh queue of `bus` to update messages; the returned list fills with deliveries."""
    received: list[Envelope] = []

    async def handle(env: Envelope) -> None:
        received.append(env)

    await bus.subscribe(f"test-relay-{uuid4().hex}", [UpdateReceived.routing_key], handle)
    return received


async def test_the_in_memory_bus_gets_the_rows_in_the_committing_task(tmp_path):
    """On the in-memory bus a commit publishes its rows before the unit of work returns: no loop turn."""
    bus = GatedBus()
    bus.publish_completes_inline = True  # the gate stays open: its publish never suspends
    async with relay_runtime(tmp_path, bus) as runtime:
        async with runtime.uow() as uow:
            first = uow.emit(update_received())
            second = uow.emit(update_received())
        assert list(bus.published) == [first, second], "published, in order, before any other task ran"
        await runtime.relay.drain()
        assert bus.published == Counter({first: 1, second: 1})
        assert await outbox_rows(runtime) == 0


async def test_deleting_a_published_row_spares_a_new_row_under_its_id(tmp_path):
    """A handed-over row is deleted by its id and message id together: a row that SQLite gave the
    same id meanwhile (ids of deleted rows are reused) stays, and a poll publishes it once."""
    bus = GatedBus()
    async with relay_runtime(tmp_path, bus) as runtime:
        first = await held_in_publish(runtime, bus)
        async with runtime.uow() as uow:
            row = await uow.session.scalar(select(OutboxMessage).where(OutboxMessage.message_id == first))
            assert row is not None
            reused_id, newcomer = row.id, uuid4()
            await uow.session.delete(row)
            await uow.session.flush()
            uow.session.add(
                OutboxMessage(
                    id=reused_id,
                    message_id=newcomer,
                    type=row.type,
                    routing_key=row.routing_key,
                    body=row.body,
                    correlation_id=None,
                    created_at=row.created_at,
                )
            )
        bus.gate.set()
        await runtime.relay.drain()
        assert bus.published == Counter({first: 1, newcomer: 1})
        assert await outbox_rows(runtime) == 0
