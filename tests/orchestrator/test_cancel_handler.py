"""CancelTraining through the orchestrator's handlers: the round closes, everyone is told, and what
was in flight when it came (the aggregation job's answer, a deadline) changes nothing afterwards."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

from sqlalchemy import update

from services.orchestrator.handlers import HANDLERS, check_deadline
from shared.bus.base import envelope_for
from shared.db.models import Training, TrainingRound
from shared.enums import RoundPhase, TrainingState
from shared.events import (
    AggregateRound,
    AggregationFailed,
    CancelTraining,
    NotificationIssued,
    StartTraining,
    utcnow,
)
from shared.messaging import Consumer
from shared.runtime import Runtime
from tests.orchestrator.test_handlers import _add_update, _aggregated_model, _outbox, _state, _training


async def test_cancel_while_aggregating_closes_the_round_and_ignores_the_late_job(runtime: Runtime) -> None:
    """ONGOING/AGGREGATING + CancelTraining -> CANCELLED, round 1 finished, TRAINING_FINISHED (state
    CANCELLED) to clients and owner; the job's ModelAggregated / AggregationFailed, a repeated cancel
    and an overdue deadline that come later are refused without effect."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    for c in clients:
        await consumer.handle(envelope_for(await _add_update(runtime, training_id, c, 1)))
    assert (await _state(runtime, training_id)).phase is RoundPhase.AGGREGATING
    assert [type(m) for m in (await _outbox(runtime))[2:]] == [AggregateRound]

    await consumer.handle(envelope_for(CancelTraining(training_id=training_id, requested_by=uuid4())))
    t = await _state(runtime, training_id)
    assert (t.state, t.phase, t.round, t.deadline_at) == (TrainingState.CANCELLED, None, 1, None)
    version, model_id = t.version, t.current_model_id
    (note,) = await _outbox(runtime)
    assert isinstance(note, NotificationIssued)
    assert note.notification_type == "TRAINING_FINISHED"
    assert note.body == {"round": 1, "global_model_uuid": str(model_id), "state": "CANCELLED"}
    assert set(note.receivers) == {*clients, t.owner_id}
    async with runtime.uow() as uow:
        r = await uow.session.get(TrainingRound, (training_id, 1))
        assert r is not None and r.finished_at is not None

    late = [
        await _aggregated_model(runtime, training_id),
        AggregationFailed(job_id=uuid4(), training_id=training_id, round=1, reason="late"),
        CancelTraining(training_id=training_id, requested_by=uuid4()),
    ]
    for message in late:
        await consumer.handle(envelope_for(message))
    async with runtime.uow() as uow:  # a deadline left over (the ticker listed it before the cancel)
        await uow.session.execute(
            update(Training)
            .where(Training.id == training_id)
            .values(deadline_at=utcnow() - timedelta(seconds=1))
        )
    async with runtime.uow() as uow:
        assert not await check_deadline(training_id, uow)

    t = await _state(runtime, training_id)
    assert (t.state, t.phase, t.version, t.current_model_id) == (
        TrainingState.CANCELLED,
        None,
        version,
        model_id,
    )
    assert await _outbox(runtime) == []
    async with runtime.uow() as uow:
        r = await uow.session.get(TrainingRound, (training_id, 1))
        assert r is not None and r.model_id is None


async def test_cancel_of_an_initial_training_then_start_is_refused(runtime: Runtime) -> None:
    """INITIAL + CancelTraining -> CANCELLED with TRAINING_FINISHED; a later StartTraining does nothing."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, _ = await _training(runtime)
    await consumer.handle(envelope_for(CancelTraining(training_id=training_id, requested_by=uuid4())))
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    t = await _state(runtime, training_id)
    assert (t.state, t.round, t.version) == (TrainingState.CANCELLED, 0, 1)
    (note,) = await _outbox(runtime)
    assert isinstance(note, NotificationIssued) and note.body["state"] == "CANCELLED"
