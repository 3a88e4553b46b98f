"""The unit of work on PostgreSQL: outbox rows publish after commit only, the inbox applies a message once."""

from __future__ import annotations

import asyncio
import contextlib
from uuid import uuid4

import pytest
from sqlalchemy import func, select

from shared.bus import Envelope
from shared.bus.base import envelope_for
from shared.codec import decode_message
from shared.db.models import InboxMessage, OutboxMessage, Principal
from shared.enums import Role
from shared.events import AggregationFailed, UpdateReceived
from shared.messaging import Consumer
from tests.db.conftest import lock_waiters, wait_until

pytestmark = pytest.mark.integration


async def listen(runtime, *routing_keys: str) -> list[Envelope]:
    """Bind a fresh test queue to `routing_keys`; the returned list fills with deliveries."""
    received: list[Envelope] = []

    async def handle(env: Envelope) -> None:
        received.append(env)

    await runtime.bus.subscribe(f"test-pg-{uuid4().hex}", routing_keys, handle)
    return received


def update_received() -> UpdateReceived:
    """A sample event."""
    return UpdateReceived(training_id=uuid4(), round=1, client_id=uuid4(), update_id=uuid4(), num_examples=10)


async def outbox_rows(runtime) -> int:
    """Rows waiting in the outbox."""
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


async def test_emit_then_commit_publishes(pg_runtime):
    """An emitted message is invisible to the relay until commit, then published and removed."""
    received = await listen(pg_runtime, UpdateReceived.routing_key)
    message = update_received()
    async with pg_runtime.uow() as uow:
        message_id = uow.emit(message)
        await uow.session.flush()
        assert await pg_runtime.relay.drain() == 0

    async def published() -> bool:
        return bool(received)

    await wait_until(published, "the published envelope")
    (envelope,) = received
    assert envelope.message_id == message_id
    assert decode_message(UpdateReceived, envelope.body) == message

    async def outbox_empty() -> bool:
        return await outbox_rows(pg_runtime) == 0

    await wait_until(outbox_empty, "the published row to leave the outbox")


async def test_rollback_publishes_nothing(pg_runtime):
    """A unit of work that raises leaves no outbox row; only the later committed fence is published."""
    received = await listen(pg_runtime, UpdateReceived.routing_key, AggregationFailed.routing_key)

    async def emit_then_fail() -> None:
        async with pg_runtime.uow() as uow:
            uow.emit(update_received())
            await uow.session.flush()
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await emit_then_fail()
    assert await outbox_rows(pg_runtime) == 0
    async with pg_runtime.uow() as uow:
        fence_id = uow.emit(AggregationFailed(job_id=uuid4(), training_id=uuid4(), round=1, reason="fence"))

    async def fenced() -> bool:
        return bool(received)

    await wait_until(fenced, "the fence")
    assert [e.message_id for e in received] == [fence_id]


async def test_redelivered_message_has_one_effect(pg_runtime):
    """The same envelope handled twice by a consumer writes its effect once."""
    message = update_received()

    async def on_update(msg: UpdateReceived, uow) -> None:
        uow.session.add(Principal(name=str(msg.update_id), role=Role.CLIENT, token_hash=uuid4().hex))

    consumer = Consumer("pg-test", {UpdateReceived: on_update}, pg_runtime.uow)
    envelope = envelope_for(message)
    await consumer.handle(envelope)
    await consumer.handle(envelope)
    async with pg_runtime.uow() as uow:
        effects = await uow.session.scalar(
            select(func.count()).select_from(Principal).where(Principal.name == str(message.update_id))
        )
    assert effects == 1


@pytest.mark.parametrize("first_commits", [True, False], ids=["first-commits", "first-rolls-back"])
async def test_a_concurrent_duplicate_claim_waits_for_the_first(pg_runtime, first_commits: bool) -> None:
    """Two transactions claiming one message id at once: the second waits on the key; it is a
    duplicate once the first commits, and the claim is its own when the first rolls back."""
    message_id = uuid4()

    class Undo(Exception):
        pass

    async def second_claim() -> bool:
        async with pg_runtime.uow() as uow:
            return await uow.claim_inbox("pg-test", message_id)

    second: asyncio.Task[bool] | None = None
    with contextlib.suppress(Undo):
        async with pg_runtime.uow() as first:
            assert await first.claim_inbox("pg-test", message_id) is True
            second = asyncio.create_task(second_claim())

            async def second_waits() -> bool:
                return await lock_waiters(pg_runtime) == 1

            await wait_until(second_waits, "the second claim to wait on the first's key")
            assert not second.done()
            if not first_commits:
                raise Undo
    assert second is not None
    assert await asyncio.wait_for(second, 10) is (not first_commits)
    async with pg_runtime.uow() as uow:
        rows = await uow.session.scalar(
            select(func.count()).select_from(InboxMessage).where(InboxMessage.message_id == message_id)
        )
    assert rows == 1


async def test_end_reads_gives_the_connection_back_and_is_refused_after_a_write(pg_runtime):
    """`end_reads` ends a read-only transaction (its connection goes back to the pool; later reads
    begin anew in the same session); after a write or an emit it raises and changes nothing."""
    pool = pg_runtime.engine.pool
    async with pg_runtime.uow() as uow:
        await uow.session.scalar(select(func.count()).select_from(Principal))
        held = pool.checkedout()
        await uow.end_reads()
        assert pool.checkedout() == held - 1
        assert await uow.session.scalar(select(func.count()).select_from(Principal)) == 0

    async def emit_then_end() -> None:
        async with pg_runtime.uow() as uow:
            uow.emit(update_received())
            await uow.end_reads()

    async def add_then_end() -> None:
        async with pg_runtime.uow() as uow:
            uow.session.add(Principal(name="p", role=Role.CLIENT, token_hash=uuid4().hex))
            await uow.end_reads()

    with pytest.raises(RuntimeError, match="after a write"):
        await emit_then_end()
    with pytest.raises(RuntimeError, match="after a write"):
        await add_then_end()
    assert await outbox_rows(pg_runtime) == 0
    async with pg_runtime.uow() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(Principal)) == 0
