"""The shared and notifier tables on PostgreSQL: every column type round-trips as the code expects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

import pytest
from sqlalchemy import select

from services.notifier.models import Notification, NotificationReceiver, WebhookDelivery
from shared.db.models import (
    ClientUpdate,
    InboxMessage,
    Model,
    OutboxMessage,
    Participant,
    Principal,
    Training,
    TrainingRound,
)
from shared.enums import Role, RoundPhase, TrainingState

pytestmark = pytest.mark.integration


async def test_types_round_trip(pg_runtime):
    """UUIDs, non-native enums, JSON, aware UTC datetimes, floats and big integers read back unchanged."""
    owner, client = uuid4(), uuid4()
    model_id, training_id = uuid4(), uuid4()
    # A non-UTC offset: UtcDateTime must hand back the same instant in UTC.
    deadline = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone(timedelta(hours=2)))
    spec = {"w": ["float32", [3, 2]], "b": ["float32", [2]]}
    async with pg_runtime.uow() as uow:
        uow.session.add_all(
            [
                Principal(id=owner, name="owner", role=Role.ACTOR, token_hash=uuid4().hex),
                Principal(id=client, name="client", role=Role.CLIENT, token_hash=uuid4().hex),
            ]
        )
        await uow.session.flush()
        uow.session.add(
            Model(id=model_id, owner_id=owner, blob_key="sha256/x", digest="x", size_bytes=2**40, spec=spec)
        )
        await uow.session.flush()
        uow.session.add(
            Training(
                id=training_id,
                owner_id=owner,
                initial_model_id=model_id,
                current_model_id=model_id,
                aggregation="fedavg",
                rounds=3,
                min_clients=1,
                round_timeout_s=0.25,
                state=TrainingState.ONGOING,
                phase=RoundPhase.COLLECTING,
                round=1,
                deadline_at=deadline,
            )
        )
        await uow.session.flush()
        uow.session.add_all(
            [
                Participant(training_id=training_id, client_id=client),
                TrainingRound(training_id=training_id, round=1, num_examples=2**40),
                ClientUpdate(
                    training_id=training_id,
                    round=1,
                    client_id=client,
                    blob_key="update/x",
                    digest="d",
                    num_examples=5,
                    metrics={"loss": 0.5, "nested": {"k": [1, 2]}},
                ),
                InboxMessage(consumer="c", message_id=uuid4()),
            ]
        )
    async with pg_runtime.uow() as uow:
        training = await uow.session.get(Training, training_id)
        model = await uow.session.get(Model, model_id)
        principal = await uow.session.get(Principal, client)
        update = await uow.session.scalar(select(ClientUpdate).where(ClientUpdate.training_id == training_id))
        assert training is not None and model is not None and principal is not None and update is not None
        assert (training.state, training.phase) == (TrainingState.ONGOING, RoundPhase.COLLECTING)
        assert training.deadline_at == deadline and training.deadline_at.tzinfo == UTC
        assert training.created_at.tzinfo == UTC and training.version == 0
        assert training.round_timeout_s == 0.25
        assert model.spec == spec and model.size_bytes == 2**40
        assert principal.role is Role.CLIENT
        assert update.metrics == {"loss": 0.5, "nested": {"k": [1, 2]}}
        # The FOR UPDATE the orchestrator's repository uses is valid on this schema.
        locked = await uow.session.scalar(
            select(Training).where(Training.id == training_id).with_for_update()
        )
        assert locked is training


async def test_big_integer_keys_autoincrement(pg_runtime):
    """outbox.id, notification.seq and webhook_delivery.id are generated, increasing 64-bit keys."""
    receiver = uuid4()
    async with pg_runtime.uow() as uow:
        first = Notification(
            event_id=uuid4(),
            training_id=uuid4(),
            notification_type="TRAINING_START",
            payload={"body": {"round": 1}},
            issued_at=datetime.now(UTC),
        )
        second = Notification(
            event_id=uuid4(),
            training_id=uuid4(),
            notification_type="TRAINING_FINISHED",
            payload={"body": {"state": "FAILED"}},
            issued_at=datetime.now(UTC),
        )
        uow.session.add_all([first, second])
        outbox = [
            OutboxMessage(message_id=uuid4(), type="T", routing_key="r", body=b"\x00\x01") for _ in range(2)
        ]
        uow.session.add_all(outbox)
        await uow.session.flush()
        uow.session.add(NotificationReceiver(principal_id=receiver, seq=second.seq))
        delivery = WebhookDelivery(seq=second.seq, principal_id=receiver, next_attempt_at=datetime.now(UTC))
        uow.session.add(delivery)
        await uow.session.flush()
        assert 0 < first.seq < second.seq
        assert 0 < outbox[0].id < outbox[1].id
        assert delivery.id > 0
        body = await uow.session.scalar(select(OutboxMessage.body).where(OutboxMessage.id == outbox[0].id))
        assert body == b"\x00\x01"
    async with pg_runtime.uow() as uow:
        seqs = (
            await uow.session.scalars(
                select(NotificationReceiver.seq).where(NotificationReceiver.principal_id == receiver)
            )
        ).all()
        assert seqs == [second.seq]
