"""Orchestrator handlers over a real SQLite database, the outbox and the inbox."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from uuid import UUID, uuid4

import pytest
from sqlalchemy import select, update

from services.orchestrator import handlers
from services.orchestrator.handlers import HANDLERS, check_deadline
from services.orchestrator.machine import TrainingView, start
from services.orchestrator.repository import ConcurrentTransition, LeftRounds, TrainingRepository
from shared.bus.base import envelope_for
from shared.codec import decode_message
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
from shared.db.models import TestMetric as MetricRow
from shared.enums import Role, RoundPhase, TrainingState
from shared.events import (
    MESSAGE_TYPES,
    AggregateRound,
    Message,
    ModelAggregated,
    NotificationIssued,
    ReceivedTestReport,
    ReceivedUpdate,
    StartTraining,
    TestMetricsReceived,
    TestReportsReceived,
    UpdateReceived,
    UpdatesReceived,
    utcnow,
)
from shared.messaging import Consumer
from shared.runtime import Runtime


async def _training(rt: Runtime, clients: int = 2, **options: object) -> tuple[UUID, list[UUID]]:
    owner, model, training = uuid4(), uuid4(), uuid4()
    client_ids = [uuid4() for _ in range(clients)]
    async with rt.uow() as uow:
        s = uow.session
        s.add(Principal(id=owner, name="actor", role=Role.ACTOR, token_hash=uuid4().hex))
        s.add_all(
            Principal(id=c, name=f"c{i}", role=Role.CLIENT, token_hash=uuid4().hex)
            for i, c in enumerate(client_ids)
        )
        await s.flush()
        s.add(Model(id=model, owner_id=owner, blob_key="sha256/abc", digest="abc", size_bytes=1, spec={}))
        await s.flush()
        s.add(
            Training(
                id=training,
                owner_id=owner,
                initial_model_id=model,
                current_model_id=model,
                aggregation="fedavg",
                rounds=2,
                min_clients=clients,
                round_timeout_s=60,
                **options,
            )
        )
        await s.flush()
        s.add_all(Participant(training_id=training, client_id=c) for c in client_ids)
    return training, client_ids


async def _outbox(rt: Runtime) -> list[Message]:
    async with rt.uow() as uow:
        rows = (await uow.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))).all()
        await uow.session.execute(OutboxMessage.__table__.delete())
    return [decode_message(MESSAGE_TYPES[r.type], r.body) for r in rows]


async def _state(rt: Runtime, training_id: UUID) -> Training:
    async with rt.uow() as uow:
        t = await uow.session.get(Training, training_id)
        assert t is not None
        return t


async def _add_update(rt: Runtime, training_id: UUID, client_id: UUID, round_: int) -> UpdatesReceived:
    """A client's update row, and the message that announces it (alone, as in a group of one)."""
    legacy = await _add_legacy_update(rt, training_id, client_id, round_)
    return UpdatesReceived(
        training_id=training_id,
        round=round_,
        updates=(ReceivedUpdate(client_id=client_id, update_id=legacy.update_id, num_examples=10),),
    )


async def _add_legacy_update(rt: Runtime, training_id: UUID, client_id: UUID, round_: int) -> UpdateReceived:
    """A client's update row, announced as an API before `UpdatesReceived` did."""
    update_id = uuid4()
    async with rt.uow() as uow:
        uow.session.add(
            ClientUpdate(
                id=update_id,
                training_id=training_id,
                round=round_,
                client_id=client_id,
                blob_key=f"update/{update_id}",
                digest="d",
                num_examples=10,
            )
        )
    return UpdateReceived(
        training_id=training_id, round=round_, client_id=client_id, update_id=update_id, num_examples=10
    )


async def _aggregated_model(rt: Runtime, training_id: UUID) -> ModelAggregated:
    """A new model's row, and the `ModelAggregated` of round 1 (two updates, 20 examples) naming it."""
    model_id = uuid4()
    async with rt.uow() as uow:
        uow.session.add(Model(id=model_id, blob_key="sha256/def", digest="def", size_bytes=1, spec={}))
    return ModelAggregated(
        job_id=uuid4(),
        training_id=training_id,
        round=1,
        model_id=model_id,
        blob_key="sha256/def",
        num_updates=2,
        num_examples=20,
    )


async def test_start_then_updates_emit_notifications_and_an_ordered_aggregation_job(runtime: Runtime) -> None:
    """StartTraining -> ONGOING + 2 notifications; the last update -> AGGREGATING + AggregateRound."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    t = await _state(runtime, training_id)
    assert (t.state, t.phase, t.round, t.version) == (TrainingState.ONGOING, RoundPhase.COLLECTING, 1, 1)
    notes = await _outbox(runtime)
    assert [n.notification_type for n in notes if isinstance(n, NotificationIssued)] == [
        "TRAINING_START",
        "UPDATE_ROUND_START",
    ]
    assert isinstance(notes[0], NotificationIssued) and set(notes[0].receivers) == {*clients, t.owner_id}

    for c in reversed(clients):
        await consumer.handle(envelope_for(await _add_update(runtime, training_id, c, 1)))
    t = await _state(runtime, training_id)
    assert t.phase is RoundPhase.AGGREGATING and t.deadline_at is None
    (job,) = await _outbox(runtime)
    assert isinstance(job, AggregateRound)
    assert [u.client_id for u in job.updates] == sorted(clients), "aggregation order must be deterministic"
    assert job.base_blob_key == "sha256/abc" and job.delete_updates_after is True


async def test_model_aggregated_moves_to_testing_and_records_the_round(runtime: Runtime) -> None:
    """ModelAggregated -> TESTING, MODEL_TEST_ROUND, the round's model noted; a repeat has no effect."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    for c in clients:
        await consumer.handle(envelope_for(await _add_update(runtime, training_id, c, 1)))
    await _outbox(runtime)
    event = await _aggregated_model(runtime, training_id)
    new_model = event.model_id
    envelope = envelope_for(event)
    await consumer.handle(envelope)
    await consumer.handle(envelope)  # redelivery
    await consumer.handle(envelope_for(event))  # same event, new message id: refused as stale
    t = await _state(runtime, training_id)
    assert (t.phase, t.current_model_id, t.version) == (RoundPhase.TESTING, new_model, 3)
    (note,) = await _outbox(runtime)
    assert isinstance(note, NotificationIssued) and note.notification_type == "MODEL_TEST_ROUND"
    assert note.body == {"round": 1, "global_model_uuid": str(new_model)}
    async with runtime.uow() as uow:
        r = await uow.session.get(TrainingRound, (training_id, 1))
        assert r is not None and (r.model_id, r.num_updates, r.num_examples) == (new_model, 2, 20)


async def test_second_start_is_refused_without_effect(runtime: Runtime) -> None:
    """A second StartTraining command is acknowledged and changes nothing."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, _ = await _training(runtime)
    for _ in range(2):
        await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    t = await _state(runtime, training_id)
    assert (t.round, t.version) == (1, 1)
    assert len(await _outbox(runtime)) == 2


async def test_deadline_with_quorum_aggregates_and_without_quorum_fails(runtime: Runtime) -> None:
    """Overdue COLLECTING: min_clients reached -> aggregate what arrived; not reached -> FAILED."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    ok_id, ok_clients = await _training(runtime, clients=3)
    bad_id, _ = await _training(runtime, clients=3)
    for tid in (ok_id, bad_id):
        await consumer.handle(envelope_for(StartTraining(training_id=tid, requested_by=uuid4())))
    async with runtime.uow() as uow:
        await uow.session.execute(
            update(Training).values(min_clients=1, deadline_at=utcnow() - timedelta(seconds=1))
        )
    await consumer.handle(envelope_for(await _add_update(runtime, ok_id, ok_clients[0], 1)))
    await _outbox(runtime)

    async with runtime.uow() as uow:
        assert set(await TrainingRepository(uow.session).overdue(utcnow())) == {ok_id, bad_id}
    async with runtime.uow() as uow:
        assert await check_deadline(ok_id, uow)
    async with runtime.uow() as uow:
        assert await check_deadline(bad_id, uow)
    assert (await _state(runtime, ok_id)).phase is RoundPhase.AGGREGATING
    bad = await _state(runtime, bad_id)
    assert bad.state is TrainingState.FAILED and "0 of the 1" in (bad.failure_reason or "")
    messages = await _outbox(runtime)
    job = next(m for m in messages if isinstance(m, AggregateRound))
    assert [u.client_id for u in job.updates] == [ok_clients[0]]
    fin = next(m for m in messages if isinstance(m, NotificationIssued))
    assert fin.notification_type == "TRAINING_FINISHED" and fin.body["state"] == "FAILED"


async def test_two_orchestrators_cannot_advance_the_same_version_twice(runtime: Runtime) -> None:
    """Compare-and-set on `version`: the second writer of the same transition is refused."""
    training_id, _ = await _training(runtime)
    async with runtime.uow() as a, runtime.uow() as b:
        ta, va = await TrainingRepository(a.session).load(training_id)
        tb, vb = await TrainingRepository(b.session).load(training_id)
        now = utcnow()
        await TrainingRepository(a.session).apply(ta, start(va, now), now)
        await a.session.commit()
        with pytest.raises(ConcurrentTransition):
            await TrainingRepository(b.session).apply(tb, start(vb, now), now)
    assert (await _state(runtime, training_id)).version == 1


async def test_updates_before_the_last_leave_no_inbox_row_and_a_redelivered_last_one_no_second_job(
    runtime: Runtime,
) -> None:
    """An update that does not complete the round changes nothing (no inbox row; handled again, it
    still changes nothing); the completing one is claimed, and its redelivery emits no second job."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime, clients=3)
    start_message = envelope_for(StartTraining(training_id=training_id, requested_by=uuid4()))
    await consumer.handle(start_message)
    await _outbox(runtime)
    first = envelope_for(await _add_update(runtime, training_id, clients[0], 1))
    await consumer.handle(first)
    await consumer.handle(first)
    assert await _inbox(runtime) == {start_message.message_id}
    assert (await _state(runtime, training_id)).phase is RoundPhase.COLLECTING
    await consumer.handle(envelope_for(await _add_update(runtime, training_id, clients[1], 1)))
    last = envelope_for(await _add_update(runtime, training_id, clients[2], 1))
    await consumer.handle(last)
    await consumer.handle(last)
    assert await _inbox(runtime) == {start_message.message_id, last.message_id}
    assert [type(m) for m in await _outbox(runtime)] == [AggregateRound]


async def test_a_round_known_to_have_moved_on_is_not_loaded_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the round's transition committed, a report whose count is complete changes nothing
    without loading the training; a process that did not see it (empty memory) loads it once, finds
    the round moved on, and remembers."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime, clients=2)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    await _outbox(runtime)
    updates = [envelope_for(await _add_update(runtime, training_id, c, 1)) for c in clients]
    loads: list[UUID] = []
    real_load = TrainingRepository.load

    async def counted_load(self: TrainingRepository, tid: UUID) -> tuple[Training, TrainingView]:
        loads.append(tid)
        return await real_load(self, tid)

    monkeypatch.setattr(TrainingRepository, "load", counted_load)
    for message in updates:
        await consumer.handle(message)
    assert len(loads) == 1  # the last update's transition
    assert [type(m) for m in await _outbox(runtime)] == [AggregateRound]
    inbox = await _inbox(runtime)

    await consumer.handle(updates[0])  # redelivered: its count is complete now
    assert len(loads) == 1
    monkeypatch.setattr(handlers, "LEFT_ROUNDS", LeftRounds())  # another orchestrator process
    await consumer.handle(updates[0])
    await consumer.handle(updates[0])
    assert len(loads) == 2
    assert await _outbox(runtime) == []
    assert await _inbox(runtime) == inbox
    assert (await _state(runtime, training_id)).phase is RoundPhase.AGGREGATING


async def _inbox(rt: Runtime) -> set[UUID]:
    async with rt.uow() as uow:
        return set(await uow.session.scalars(select(InboxMessage.message_id)))


async def concurrent_updates_make_one_job(rt: Runtime) -> None:
    """Ten clients' updates, one message each, handled all at once (as with prefetch 8): one
    AggregateRound, one transition, and the round's updates all in the job."""
    consumer = Consumer("orchestrator", HANDLERS, rt.uow)
    training_id, clients = await _training(rt, clients=10)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    await _outbox(rt)
    messages = [envelope_for(await _add_update(rt, training_id, c, 1)) for c in clients]
    await asyncio.gather(*(consumer.handle(m) for m in messages))
    t = await _state(rt, training_id)
    assert (t.phase, t.version) == (RoundPhase.AGGREGATING, 2)
    (job,) = await _outbox(rt)
    assert isinstance(job, AggregateRound)
    assert sorted(u.client_id for u in job.updates) == sorted(clients)


async def test_concurrently_handled_updates_make_one_aggregation_job(runtime: Runtime) -> None:
    """On SQLite (embedded): see `concurrent_updates_make_one_job`."""
    await concurrent_updates_make_one_job(runtime)


async def test_a_batch_of_updates_counts_them_all(runtime: Runtime) -> None:
    """Updates announced together (one group of reports): the message with the round's last ones
    moves it on; one before it, covering part of the round, changes nothing."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime, clients=5)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    await _outbox(runtime)

    async def batch(members: list[UUID]) -> UpdatesReceived:
        added = [await _add_update(runtime, training_id, c, 1) for c in members]
        return UpdatesReceived(training_id=training_id, round=1, updates=tuple(a.updates[0] for a in added))

    await consumer.handle(envelope_for(await batch(clients[:3])))
    assert (await _state(runtime, training_id)).phase is RoundPhase.COLLECTING
    assert await _outbox(runtime) == []
    await consumer.handle(envelope_for(await batch(clients[3:])))
    assert (await _state(runtime, training_id)).phase is RoundPhase.AGGREGATING
    (job,) = await _outbox(runtime)
    assert isinstance(job, AggregateRound)
    assert [u.client_id for u in job.updates] == sorted(clients)


async def test_an_older_apis_one_update_messages_are_still_counted(runtime: Runtime) -> None:
    """`UpdateReceived` (one per update, from an API before batches) left on the queue across an
    upgrade: counted as before, mixed with batches."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime, clients=3)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    await _outbox(runtime)
    for c in clients[:2]:
        await consumer.handle(envelope_for(await _add_legacy_update(runtime, training_id, c, 1)))
    assert (await _state(runtime, training_id)).phase is RoundPhase.COLLECTING
    await consumer.handle(envelope_for(await _add_update(runtime, training_id, clients[2], 1)))
    assert (await _state(runtime, training_id)).phase is RoundPhase.AGGREGATING
    (job,) = await _outbox(runtime)
    assert isinstance(job, AggregateRound) and len(job.updates) == 3


async def test_test_reports_move_the_round_on_batched_or_one_by_one(runtime: Runtime) -> None:
    """In TESTING: a `TestReportsReceived` with part of the reports changes nothing; the rest, here
    as an older API's `TestMetricsReceived`, moves the training to round 2."""
    consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
    training_id, clients = await _training(runtime)
    await consumer.handle(envelope_for(StartTraining(training_id=training_id, requested_by=uuid4())))
    for c in clients:
        await consumer.handle(envelope_for(await _add_update(runtime, training_id, c, 1)))
    await consumer.handle(envelope_for(await _aggregated_model(runtime, training_id)))
    await _outbox(runtime)

    async def report(client_id: UUID) -> None:
        async with runtime.uow() as uow:
            uow.session.add(
                MetricRow(
                    id=uuid4(),
                    training_id=training_id,
                    round=1,
                    client_id=client_id,
                    num_examples=4,
                    metrics={},
                )
            )

    await report(clients[0])
    first = TestReportsReceived(
        training_id=training_id, round=1, reports=(ReceivedTestReport(client_id=clients[0], num_examples=4),)
    )
    await consumer.handle(envelope_for(first))
    assert (await _state(runtime, training_id)).phase is RoundPhase.TESTING
    assert await _outbox(runtime) == []
    await report(clients[1])
    legacy = TestMetricsReceived(training_id=training_id, round=1, client_id=clients[1], num_examples=4)
    await consumer.handle(envelope_for(legacy))
    t = await _state(runtime, training_id)
    assert (t.round, t.phase) == (2, RoundPhase.COLLECTING)
    (note,) = await _outbox(runtime)
    assert isinstance(note, NotificationIssued) and note.notification_type == "UPDATE_ROUND_START"
