"""Event handlers of the orchestrator: load the training, call the machine, apply the step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from uuid import UUID, uuid4

import structlog

from services.orchestrator import machine
from services.orchestrator.machine import Step, TrainingView
from services.orchestrator.repository import LEFT_ROUNDS, ROUND_COUNTS, TrainingRepository
from shared.db.models import Model, Training
from shared.db.uow import UnitOfWork
from shared.enums import RoundPhase
from shared.errors import IllegalTransition, NotFound
from shared.events import (
    AggregateRound,
    AggregationFailed,
    CancelTraining,
    Message,
    ModelAggregated,
    NotificationIssued,
    StartTraining,
    TestMetricsReceived,
    TestReportsReceived,
    UpdateReceived,
    UpdateRef,
    UpdatesReceived,
    utcnow,
)
from shared.messaging import Handler, handling
from shared.metrics import REGISTRY, seconds_since

log = structlog.get_logger(component="orchestrator")

Transition = Callable[[], Step | None]

TRIGGER_SECONDS = REGISTRY.histogram(
    "fedhub_orchestrator_trigger_seconds",
    "From the message that moved a training (its outbox row) or the deadline that passed, to the "
    "commit of the transition and of what it emits (the aggregation job, the next notification)",
    ("on", "emits"),
)


async def on_start_training(command: StartTraining, uow: UnitOfWork) -> None:
    """INITIAL -> ONGOING; a second start is refused (logged, acknowledged, no effect)."""
    repo = TrainingRepository(uow.session)
    training, view = await repo.load(command.training_id)
    now = utcnow()
    await _attempt(uow, repo, training, lambda: machine.start(view, now), now)


async def on_cancel_training(command: CancelTraining, uow: UnitOfWork) -> None:
    """INITIAL or ONGOING -> CANCELLED; a cancel of a finished training is refused (logged, no effect)."""
    repo = TrainingRepository(uow.session)
    training, view = await repo.load(command.training_id)
    now = utcnow()
    await _attempt(uow, repo, training, lambda: machine.cancel(view), now)


async def on_updates_received(event: UpdatesReceived | UpdateReceived, uow: UnitOfWork) -> None:
    """Count the round's updates; with all participants in, emit the aggregation job.

    Every message but the one of the round's last updates changes nothing: that is found without
    locking the training (the count only grows, and the message of the last updates to commit sees
    all of them), and leaves no inbox row (`changed_nothing`). A one-update `UpdateReceived` (from
    an API before batches) counts alike.
    """
    repo = TrainingRepository(uow.session)
    received = await _shared_count(uow, TrainingRepository.count_updates, event.training_id, event.round)
    if received < await repo.participants(event.training_id):
        uow.changed_nothing()
        return
    await _round_complete(
        uow,
        repo,
        event.training_id,
        event.round,
        RoundPhase.COLLECTING,
        lambda view, _: machine.update_received(view, event.round, received),
    )


async def on_model_aggregated(event: ModelAggregated, uow: UnitOfWork) -> None:
    """Adopt the round's global model, then test it or move to the next round or finish.

    The round's timeline counts the updates aggregated; rejected ones are on their own rows.
    """
    repo = TrainingRepository(uow.session)
    training, view = await repo.load(event.training_id)
    now = utcnow()
    applied = await _attempt(
        uow, repo, training, lambda: machine.model_aggregated(view, event.round, event.model_id, now), now
    )
    if applied:
        await repo.record_aggregation(
            training.id, event.round, event.model_id, event.num_updates, event.num_examples, now
        )


async def on_aggregation_failed(event: AggregationFailed, uow: UnitOfWork) -> None:
    """The round could not be aggregated: the training fails with the aggregator's reason."""
    repo = TrainingRepository(uow.session)
    training, view = await repo.load(event.training_id)
    now = utcnow()
    await _attempt(
        uow, repo, training, lambda: machine.aggregation_failed(view, event.round, event.reason), now
    )


async def on_test_reports_received(event: TestReportsReceived | TestMetricsReceived, uow: UnitOfWork) -> None:
    """Count the round's test reports; with all participants in, move on (else: changed nothing)."""
    repo = TrainingRepository(uow.session)
    reported = await _shared_count(uow, TrainingRepository.count_test_reports, event.training_id, event.round)
    if reported < await repo.participants(event.training_id):
        uow.changed_nothing()  # as for updates: found without a lock, no inbox row
        return
    await _round_complete(
        uow,
        repo,
        event.training_id,
        event.round,
        RoundPhase.TESTING,
        lambda view, now: machine.test_reported(view, event.round, reported, now),
    )


async def _round_complete(
    uow: UnitOfWork,
    repo: TrainingRepository,
    training_id: UUID,
    round_: int,
    phase: RoundPhase,
    transition: Callable[[TrainingView, datetime], Step | None],
) -> None:
    """Every participant has reported for `phase` of the round: move the training on, unless it
    has left that phase already (known to this process, or found in the row), which changes nothing."""
    if LEFT_ROUNDS.has_left(training_id, round_, phase):
        uow.changed_nothing()
        return
    training, view = await repo.load(training_id)
    if machine.has_left(view, round_, phase):
        LEFT_ROUNDS.left(training_id, round_, phase)
        uow.changed_nothing()
        return
    now = utcnow()
    if await _attempt(uow, repo, training, lambda: transition(view, now), now):
        uow.after_commit(lambda: LEFT_ROUNDS.left(training_id, round_, phase))
    else:
        uow.changed_nothing()


RoundCount = Callable[[TrainingRepository, UUID, int], Awaitable[int]]


async def _shared_count(uow: UnitOfWork, count: RoundCount, training_id: UUID, round_: int) -> int:
    """`count` (`TrainingRepository.count_updates` or `.count_test_reports`) of the round, shared
    with the handlers that need it at the same time (`ROUND_COUNTS`), read in a session of its own."""

    async def query() -> int:
        async with uow.sessions() as session:
            return await count(TrainingRepository(session), training_id, round_)

    return await ROUND_COUNTS.read((count.__name__, training_id, round_), query)


async def check_deadline(training_id: UUID, uow: UnitOfWork) -> bool:
    """Time out the training's current phase if its deadline passed; True when it moved."""
    repo = TrainingRepository(uow.session)
    training, view = await repo.load(training_id)
    received = await repo.count_updates(training.id, view.round)
    now = utcnow()
    cause = ("deadline", view.deadline_at) if view.deadline_at is not None else None
    return await _attempt(
        uow, repo, training, lambda: machine.deadline_passed(view, received, now), now, cause=cause
    )


HANDLERS: Mapping[type[Message], Handler] = {
    StartTraining: on_start_training,
    CancelTraining: on_cancel_training,
    UpdatesReceived: on_updates_received,
    UpdateReceived: on_updates_received,
    ModelAggregated: on_model_aggregated,
    AggregationFailed: on_aggregation_failed,
    TestReportsReceived: on_test_reports_received,
    TestMetricsReceived: on_test_reports_received,
}
"""The orchestrator's registry; its queue's bindings derive from it."""


async def _attempt(
    uow: UnitOfWork,
    repo: TrainingRepository,
    training: Training,
    transition: Transition,
    now: datetime,
    *,
    cause: tuple[str, datetime] | None = None,
) -> bool:
    """Run a transition; an illegal one (stale or repeated event) is logged and has no effect.

    `cause` (what moved the training, and when) defaults to the message being handled; the time
    from it to the transition's commit is the trigger latency.
    """
    try:
        step = transition()
    except IllegalTransition as exc:
        log.info("transition.refused", training_id=str(training.id), reason=exc.detail)
        return False
    if step is None:
        return False
    await _apply(uow, repo, training, step, now)
    envelope = handling()
    if cause is None and envelope is not None:
        cause = (envelope.type, envelope.created_at)
    if cause is not None:
        on, since = cause
        emits = "aggregation" if step.aggregate else "+".join(str(n.type) for n in step.notices) or "none"
        uow.after_commit(lambda: TRIGGER_SECONDS.observe(seconds_since(since), on=on, emits=emits))
    return True


async def _apply(
    uow: UnitOfWork, repo: TrainingRepository, training: Training, step: Step, now: datetime
) -> None:
    previous_round = training.round
    await repo.apply(training, step, now)
    if step.aggregate:
        await _emit_aggregation(uow, repo, training, previous_round)
    if step.notices:
        receivers = await repo.receivers(training)
        for notice in step.notices:
            uow.emit(
                NotificationIssued(
                    event_id=uuid4(),
                    notification_type=notice.type,
                    training_id=training.id,
                    receivers=receivers,
                    body=notice.body,
                    issued_at=now,
                )
            )
    log.info(
        "training.advanced",
        training_id=str(training.id),
        state=step.state.value,
        phase=step.phase.value if step.phase else None,
        round=step.round,
    )


async def _emit_aggregation(
    uow: UnitOfWork, repo: TrainingRepository, training: Training, round_: int
) -> None:
    updates = await repo.updates(training.id, round_)
    base = await uow.session.get(Model, training.current_model_id)
    if base is None:
        raise NotFound(f"model {training.current_model_id} of training {training.id} does not exist")
    spec = training.aggregation_spec()
    uow.emit(
        AggregateRound(
            job_id=uuid4(),
            training_id=training.id,
            round=round_,
            method=spec.method.value,
            params=dict(spec.params),
            update_kind=spec.update_kind.value,
            exclude_vars=spec.exclude_vars,
            max_update_norm=spec.max_update_norm,
            base_model_id=training.current_model_id,
            base_blob_key=base.blob_key,
            base_state_blob_key=base.state_blob_key,
            updates=tuple(
                UpdateRef(
                    update_id=u.id, client_id=u.client_id, blob_key=u.blob_key, num_examples=u.num_examples
                )
                for u in updates
            ),
            delete_updates_after=training.delete_local_models_after_aggregation,
        )
    )
