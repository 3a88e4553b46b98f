"""The unit of work: outbox rows publish only after commit, rollbacks publish nothing, the inbox
claims a message id once, and after-commit callbacks run only after a commit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast
from uuid import uuid4

import pytest
from sqlalchemy import Table, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from shared.bus import Envelope
from shared.codec import decode_message, encode_message
from shared.db.base import dialect_insert
from shared.db.models import InboxMessage, OutboxMessage, Principal
from shared.enums import Role
from shared.events import AggregationFailed, UpdateReceived
from shared.messaging import Consumer
from shared.runtime import Runtime

DEADLINE_S = 10.0


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def listen(runtime: Runtime, *routing_keys: str) -> list[Envelope]:
    """Bind a fresh test queue to `routing_keys`; the returned list fills with deliveries."""
    received: list[Envelope] = []

    async def handle(env: Envelope) -> None:
        received.append(env)

    await runtime.bus.subscribe(f"test-uow-{uuid4().hex}", routing_keys, handle)
    return received


def update_received() -> UpdateReceived:
    """A sample event."""
    return UpdateReceived(training_id=uuid4(), round=1, client_id=uuid4(), update_id=uuid4(), num_examples=10)


async def outbox_rows(runtime: Runtime) -> int:
    """Rows waiting in the outbox."""
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(func.count()).select_from(OutboxMessage)) or 0


async def test_emit_then_commit_publishes_the_envelope(runtime):
    """An emitted message is invisible to the relay until commit, then published as written."""
    received = await listen(runtime, UpdateReceived.routing_key)
    message, correlation_id = update_received(), uuid4()
    async with runtime.uow() as uow:
        message_id = uow.emit(message, correlation_id=correlation_id)
        await uow.session.flush()
        assert await runtime.relay.drain() == 0
    await wait_until(lambda: bool(received), "the published envelope")
    (envelope,) = received
    assert envelope.message_id == message_id
    assert (envelope.type, envelope.routing_key) == ("UpdateReceived", "update.received")
    assert envelope.correlation_id == correlation_id
    assert decode_message(UpdateReceived, envelope.body) == message
    # The relay deletes the row in the transaction it published from, which may end just after delivery.
    deadline = time.monotonic() + DEADLINE_S
    while await outbox_rows(runtime):
        assert time.monotonic() < deadline, "the published row stayed in the outbox"
        await asyncio.sleep(0.005)


async def test_rollback_publishes_nothing(runtime):
    """A unit of work that raises leaves no outbox row; only the later committed message is published."""
    received = await listen(runtime, UpdateReceived.routing_key, AggregationFailed.routing_key)

    async def emit_then_fail() -> None:
        async with runtime.uow() as uow:
            uow.emit(update_received())
            await uow.session.flush()
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await emit_then_fail()
    assert await outbox_rows(runtime) == 0
    fence = AggregationFailed(job_id=uuid4(), training_id=uuid4(), round=1, reason="fence")
    async with runtime.uow() as uow:
        fence_id = uow.emit(fence)
    await wait_until(lambda: bool(received), "the fence")
    assert [e.message_id for e in received] == [fence_id]


async def test_claim_inbox_once_per_consumer(runtime):
    """The second claim of a message id by a consumer is False; another consumer may still claim it."""
    message_id = uuid4()
    async with runtime.uow() as uow:
        assert await uow.claim_inbox("orchestrator", message_id) is True
    async with runtime.uow() as uow:
        assert await uow.claim_inbox("orchestrator", message_id) is False
        assert await uow.claim_inbox("notifier", message_id) is True
    async with runtime.uow() as uow:
        assert await uow.claim_inbox("notifier", message_id) is False


async def test_claim_inbox_twice_in_one_unit_of_work(runtime):
    """A duplicate inside the same transaction is already seen."""
    message_id = uuid4()
    async with runtime.uow() as uow:
        assert await uow.claim_inbox("aggregator", message_id) is True
        assert await uow.claim_inbox("aggregator", message_id) is False


async def test_rolled_back_claim_is_forgotten(runtime):
    """A claim whose transaction rolls back does not count: the redelivery is applied."""
    message_id = uuid4()

    async def claim_then_fail() -> None:
        async with runtime.uow() as uow:
            assert await uow.claim_inbox("aggregator", message_id) is True
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await claim_then_fail()
    async with runtime.uow() as uow:
        assert await uow.claim_inbox("aggregator", message_id) is True


def principal() -> Principal:
    """A row to write."""
    return Principal(id=uuid4(), name="p", role=Role.CLIENT, token_hash=uuid4().hex)


async def test_after_commit_runs_after_the_commit(runtime):
    """Callbacks, sync and async, run in order once committed state is visible to other sessions."""
    row = principal()
    calls: list[object] = []

    async def sees_the_row() -> None:
        async with runtime.uow() as other:
            calls.append(await other.session.get(Principal, row.id) is not None)

    async with runtime.uow() as uow:
        uow.session.add(row)
        uow.after_commit(sees_the_row)
        uow.after_commit(lambda: calls.append("sync"))
        await uow.session.flush()
        assert calls == []
    assert calls == [True, "sync"]


async def test_after_commit_never_runs_after_a_rollback(runtime):
    """Neither an exception in the block nor a failing commit runs the callbacks."""
    calls: list[str] = []

    async def register_then_fail() -> None:
        async with runtime.uow() as uow:
            uow.after_commit(lambda: calls.append("raised"))
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        await register_then_fail()

    first = principal()
    async with runtime.uow() as uow:
        uow.session.add(first)

    async def register_then_conflict() -> None:
        async with runtime.uow() as uow:
            uow.session.add(Principal(id=uuid4(), name="dup", role=Role.CLIENT, token_hash=first.token_hash))
            uow.after_commit(lambda: calls.append("commit failed"))

    with pytest.raises(IntegrityError):
        await register_then_conflict()
    assert calls == []


async def test_session_outside_the_block_is_refused(runtime):
    """Using a unit of work's session outside `async with` is an error, not a silent new session."""
    uow = runtime.uow()
    with pytest.raises(RuntimeError):
        _ = uow.session
    async with uow:
        pass
    with pytest.raises(RuntimeError):
        _ = uow.session


async def test_a_message_that_changed_nothing_leaves_no_inbox_row(runtime):
    """`changed_nothing`: the consumer records no inbox row (applying it again changes nothing); a
    handler that emitted or added rows anyway still gets its row, so a redelivery is dropped."""
    received = await listen(runtime, UpdateReceived.routing_key)
    emit = {"on": False}
    applied: list[str] = []

    async def handler(message: UpdateReceived, uow) -> None:
        applied.append(str(message.update_id))
        if emit["on"]:
            uow.emit(update_received())
        uow.changed_nothing()

    consumer = Consumer("test-unchanged", {UpdateReceived: handler}, runtime.uow)
    quiet = Envelope(
        message_id=uuid4(),
        type="UpdateReceived",
        routing_key=UpdateReceived.routing_key,
        body=encode_message(update_received()),
    )
    await consumer.handle(quiet)
    await consumer.handle(quiet)
    assert len(applied) == 2, "no inbox row: the redelivery runs the (effect-free) handler again"

    async def inbox_rows() -> int:
        async with runtime.uow() as uow:
            return await uow.session.scalar(select(func.count()).select_from(InboxMessage)) or 0

    assert await inbox_rows() == 0
    emit["on"] = True
    loud = Envelope(
        message_id=uuid4(),
        type="UpdateReceived",
        routing_key=UpdateReceived.routing_key,
        body=encode_message(update_received()),
    )
    await consumer.handle(loud)
    await consumer.handle(loud)
    assert await inbox_rows() == 1, "it emitted: the declaration is overridden and the inbox claimed"
    await runtime.relay.drain()
    await wait_until(lambda: len(received) >= 1, "the emitted message")
    assert len(received) == 1, "the redelivery's emit was rolled back with it"


async def test_a_unit_of_work_that_began_nothing_ends_nothing(runtime, monkeypatch):
    """No statement, no object: no commit (or rollback) to run, and the after-commit callbacks still
    run; one statement, and the commit runs as always."""
    from sqlalchemy.ext.asyncio import AsyncSession

    ended: list[str] = []
    real_commit, real_rollback = AsyncSession.commit, AsyncSession.rollback

    async def commit(self: AsyncSession) -> None:
        ended.append("commit")
        await real_commit(self)

    async def rollback(self: AsyncSession) -> None:
        ended.append("rollback")
        await real_rollback(self)

    monkeypatch.setattr(AsyncSession, "commit", commit)
    monkeypatch.setattr(AsyncSession, "rollback", rollback)
    after: list[str] = []
    async with runtime.uow() as uow:
        uow.after_commit(lambda: after.append("ran"))
    assert (ended, after) == ([], ["ran"])
    with pytest.raises(RuntimeError):
        async with runtime.uow():
            raise RuntimeError("refused before any statement")
    assert ended == []
    async with runtime.uow() as uow:
        await uow.session.scalar(select(func.count()).select_from(Principal))
    assert ended == ["commit"]


async def test_a_session_left_with_nothing_is_not_closed(runtime, monkeypatch):
    """At the end, a session with no transaction and no object holds no connection and nothing to
    detach: it is dropped without a close. One still holding an object, or a transaction, is closed
    (the object detached), and every connection is back in the pool either way."""
    from sqlalchemy.ext.asyncio import AsyncSession

    closed: list[AsyncSession] = []
    real_close = AsyncSession.close

    async def close(self: AsyncSession) -> None:
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(AsyncSession, "close", close)
    async with runtime.uow() as uow:
        await uow.session.scalar(select(func.count()).select_from(Principal))  # Core: no object
    assert closed == []
    added = Principal(id=uuid4(), name="kept", role=Role.CLIENT, token_hash=uuid4().hex)
    async with runtime.uow() as uow:
        uow.session.add(added)
    async with runtime.uow() as uow:
        loaded = await uow.session.scalar(select(Principal).where(Principal.name == "kept"))
        assert loaded is not None
    assert len(closed) == 2, "the insert's session and the load's still held their objects"
    assert inspect(added).detached and inspect(loaded).detached
    assert runtime.engine.pool.checkedout() == 0


def test_dialect_insert_builds_each_dialects_own_and_names_an_unsupported_one() -> None:
    table = cast(Table, InboxMessage.__table__)
    assert isinstance(dialect_insert("postgresql", table), postgresql.Insert)
    assert isinstance(dialect_insert("sqlite", table), sqlite.Insert)
    with pytest.raises(NotImplementedError, match="mysql"):
        dialect_insert("mysql", table)
