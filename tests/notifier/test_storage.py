"""Storing notifications: receivers and webhook deliveries in bulk, in the consumer's transaction."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from uuid import UUID, uuid4

import pytest
import torch
from sqlalchemy import event, func, select

from services.notifier.handlers import store_notification
from services.notifier.models import Notification, NotificationReceiver, Webhook, WebhookDelivery
from services.notifier.service import Notifier
from shared.blobs import content_key
from shared.bus.base import envelope_for
from shared.codec import encode_tensors
from shared.db.models import Model
from shared.events import NotificationIssued, NotificationType
from shared.tensors import state_dict_to_records
from tests.notifier.conftest import expected_payload, make_principal, notification


async def test_thousand_receivers_are_bulk_inserted(runtime, settings):
    """1,000 receivers: one notification, 1,000 receiver rows in one INSERT, a delivery per webhook."""
    with_hooks = [await make_principal(runtime, f"hooked-{i}") for i in range(3)]
    async with runtime.uow() as uow:
        for caller in with_hooks:
            uow.session.add(Webhook(principal_id=caller.id, url="http://127.0.0.1:9/h", secret="s" * 16))
    receivers = [c.id for c in with_hooks] + [uuid4() for _ in range(997)]
    notifier = Notifier(settings, runtime)

    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", record)
    try:
        await notifier.consumer.handle(envelope_for(notification(receivers)))
    finally:
        event.remove(runtime.engine.sync_engine, "before_cursor_execute", record)

    receiver_inserts = [s for s in statements if s.startswith("INSERT INTO notification_receiver")]
    assert len(receiver_inserts) == 1
    assert len(statements) < 12
    async with runtime.uow() as uow:
        count = uow.session.scalar
        assert await count(select(func.count()).select_from(Notification)) == 1
        assert await count(select(func.count()).select_from(NotificationReceiver)) == 1000
        deliveries = (await uow.session.scalars(select(WebhookDelivery))).all()
    assert {d.principal_id for d in deliveries} == {c.id for c in with_hooks}
    assert all(d.attempts == 0 and d.next_attempt_at is not None for d in deliveries)


async def test_nothing_is_stored_when_the_transaction_fails(runtime, settings):
    """A failing unit of work leaves no notification, no receivers and nothing published to the hub."""
    caller = await make_principal(runtime, "client")
    notifier = Notifier(settings, runtime)
    sub = notifier.hub.subscribe(caller.id)
    message = notification([caller.id])
    handler = next(iter(notifier.consumer._handlers.values()))

    class Boom(Exception):
        pass

    try:
        async with runtime.uow() as uow:
            await handler(message, uow)
            raise Boom
    except Boom:
        pass
    async with runtime.uow() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(Notification)) == 0
    assert sub.buffered == 0


async def test_store_notification_returns_what_the_hub_needs(runtime):
    """The stored notification carries its seq, receivers, SSE frame and the deliveries it created."""
    hooked = await make_principal(runtime, "hooked")
    plain = await make_principal(runtime, "plain")
    async with runtime.uow() as uow:
        uow.session.add(Webhook(principal_id=hooked.id, url="http://127.0.0.1:9/h", secret="s" * 16))
    message = notification([hooked.id, plain.id])
    async with runtime.uow() as uow:
        stored = await store_notification(message, uow)
    assert stored is not None
    assert stored.webhook_deliveries == 1
    assert stored.live.receivers == {hooked.id, plain.id}
    assert stored.live.training_id == message.training_id
    head, data = stored.live.frame.split(b"data: ")
    assert head == b"id: %d\nevent: UPDATE_ROUND_START\n" % stored.live.seq
    assert data.endswith(b"}\n\n")
    assert json.loads(data) == expected_payload(message)
    async with runtime.uow() as uow:
        assert await store_notification(message, uow) is None


async def _model(runtime, state: dict[str, torch.Tensor]) -> tuple[UUID, bytes]:
    """A model row and its blob, as the API or the aggregator stores them."""
    data = encode_tensors(state_dict_to_records(state))
    key, digest = content_key(data)
    await runtime.blobs.put(key, data)
    model = Model(blob_key=key, digest=digest, size_bytes=len(data), spec={})
    async with runtime.uow() as uow:
        uow.session.add(model)
        await uow.session.flush()
        model_id = model.id
    return model_id, data


def _issued(model_id: UUID, kind: NotificationType, receivers: list[UUID]) -> NotificationIssued:
    return NotificationIssued(
        event_id=uuid4(),
        notification_type=kind,
        training_id=uuid4(),
        receivers=tuple(receivers),
        body={"round": 1, "global_model_uuid": model_id},
    )


@pytest.mark.parametrize(
    ("kind", "max_bytes", "inlined"),
    [
        (NotificationType.UPDATE_ROUND_START, 91, True),
        (NotificationType.MODEL_TEST_ROUND, 64 * 1024, True),
        (NotificationType.TRAINING_START, 64 * 1024, False),
        (NotificationType.UPDATE_ROUND_START, 90, False),  # the model (91 bytes) is larger: only named
        (NotificationType.UPDATE_ROUND_START, 0, False),  # turned off
    ],
)
async def test_a_round_notification_carries_a_small_model(runtime, settings, kind, max_bytes, inlined):
    """The stored payload and the stream frame hold the model's own bytes (and their sha256) when
    the model is at most FEDHUB_INLINE_MODEL_MAX_BYTES; otherwise the contract payload as before."""
    caller = await make_principal(runtime, "client")
    model_id, data = await _model(runtime, {"w": torch.arange(12.0).reshape(3, 4)})
    notifier = Notifier(settings.model_copy(update={"inline_model_max_bytes": max_bytes}), runtime)
    sub = notifier.hub.subscribe(caller.id)
    message = _issued(model_id, kind, [caller.id])
    await notifier.consumer.handle(envelope_for(message))
    async with runtime.uow() as uow:
        stored = (await uow.session.scalars(select(Notification))).one()
    body = stored.payload["body"]
    live = await asyncio.wait_for(sub.get(), 5)
    assert live is not None
    frame = json.loads(live.frame.split(b"data: ", 1)[1])
    assert frame == stored.payload
    if not inlined:
        assert "global_model" not in body
        return
    inline = body.pop("global_model")
    assert body == {"round": 1, "global_model_uuid": str(model_id)}
    assert inline["media_type"] == "application/msgpack"
    assert base64.b64decode(inline["base64"]) == data
    assert inline["sha256"] == hashlib.sha256(data).hexdigest()
