"""Loading and saving training state for the orchestrator's transitions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast
from uuid import UUID

from sqlalchemy import Select, Table, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.orchestrator.machine import Step, TrainingView
from shared.coalesce import NextReads
from shared.db.models import ClientUpdate, Participant, TestMetric, Training, TrainingRound
from shared.enums import RoundPhase
from shared.errors import Conflict, NotFound
from shared.lru import Lru


def _count_of(entity: type[ClientUpdate | TestMetric]) -> Select[int]:
    table = cast(Table, entity.__table__)
    return (
        select(func.count())
        .select_from(table)
        .where(table.c.training_id == bindparam("training_id"), table.c.round == bindparam("round"))
    )


_COUNT_UPDATES = _count_of(ClientUpdate)
_COUNT_TEST_REPORTS = _count_of(TestMetric)
"""Built once, run with parameters: the orchestrator counts a round's reports once per report (at
1,000 clients, building the statement each time was a visible share of its CPU)."""


ROUND_COUNTS: NextReads[int] = NextReads()
"""The orchestrator process's shared counts of a round's reports (updates, test reports): handlers of
reports that arrive together (a group of uploads, a prefetch window) share two counts instead of
running one each, and open no transaction of their own."""


class LeftRounds:
    """Rounds this process knows a training has left a phase of (`machine.has_left`): seen in a
    committed row, or moved on by a transition this process committed. True once, true for good.

    A round's reports arrive in groups, and every handler whose count already includes the round's
    last report would otherwise lock and load the training to find the transition done: at 1,000
    clients hundreds of them per round (12% of the embedded server's loop)."""

    def __init__(self, size: int = 4096) -> None:
        self._known: Lru[tuple[UUID, int, RoundPhase], bool] = Lru(size)

    def has_left(self, training_id: UUID, round_: int, phase: RoundPhase) -> bool:
        """Whether the training is known to be past `phase` of `round_`."""
        return self._known.get((training_id, round_, phase)) is not None

    def left(self, training_id: UUID, round_: int, phase: RoundPhase) -> None:
        """Remember that the training is past `phase` of `round_` (only from committed state)."""
        self._known.put((training_id, round_, phase), True)


LEFT_ROUNDS = LeftRounds()
"""The orchestrator process's memory of rounds that moved on."""

_PARTICIPANTS: Lru[UUID, int] = Lru(4096)
"""Participants per training: a fact that never changes once the training exists (a per-process LRU)."""


class ConcurrentTransition(Conflict):
    """Another orchestrator advanced the training first; the message is retried on fresh state."""


class TrainingRepository:
    """Training rows as the state machine sees them, within the caller's unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def load(self, training_id: UUID) -> tuple[Training, TrainingView]:
        """The training row (locked FOR UPDATE on PostgreSQL) and its view."""
        training = await self.session.scalar(
            select(Training).where(Training.id == training_id).with_for_update()
        )
        if training is None:
            raise NotFound(f"training {training_id} does not exist")
        return training, view_of(training, await self.participants(training_id))

    async def participants(self, training_id: UUID) -> int:
        """How many clients take part (fixed at creation: counted once per process and training)."""
        known = _PARTICIPANTS.get(training_id)
        if known is not None:
            return known
        n = await self.session.scalar(
            select(func.count()).select_from(Participant).where(Participant.training_id == training_id)
        )
        if n:
            _PARTICIPANTS.put(training_id, n)
        return n or 0

    async def count_updates(self, training_id: UUID, round_: int) -> int:
        """How many updates the round has (all of them: the aggregator rejects some only later)."""
        n = await self.session.scalar(_COUNT_UPDATES, {"training_id": training_id, "round": round_})
        return n or 0

    async def count_test_reports(self, training_id: UUID, round_: int) -> int:
        """How many test reports the round has."""
        n = await self.session.scalar(_COUNT_TEST_REPORTS, {"training_id": training_id, "round": round_})
        return n or 0

    async def updates(self, training_id: UUID, round_: int) -> Sequence[ClientUpdate]:
        """The round's updates in a deterministic order (by client id), so aggregation is reproducible."""
        rows = await self.session.scalars(
            select(ClientUpdate)
            .where(ClientUpdate.training_id == training_id, ClientUpdate.round == round_)
            .order_by(ClientUpdate.client_id)
        )
        return rows.all()

    async def receivers(self, training: Training) -> tuple[UUID, ...]:
        """Who hears of this training: every participant and the owner."""
        rows = await self.session.scalars(
            select(Participant.client_id).where(Participant.training_id == training.id)
        )
        return (*rows.all(), training.owner_id)

    async def apply(self, training: Training, step: Step, now: datetime) -> None:
        """Write the step's fields with a version check, and keep the round timeline."""
        result = await self.session.execute(
            update(Training)
            .where(Training.id == training.id, Training.version == training.version)
            .values(
                state=step.state,
                phase=step.phase,
                round=step.round,
                deadline_at=step.deadline_at,
                current_model_id=step.current_model_id,
                failure_reason=step.failure_reason,
                version=Training.version + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise ConcurrentTransition(f"training {training.id} changed while it was being advanced")
        if step.round_finished is not None:
            await self.session.execute(
                update(TrainingRound)
                .where(TrainingRound.training_id == training.id, TrainingRound.round == step.round_finished)
                .values(finished_at=now)
            )
        if step.round_started:
            self.session.add(TrainingRound(training_id=training.id, round=step.round, started_at=now))

    async def record_aggregation(
        self,
        training_id: UUID,
        round_: int,
        model_id: UUID,
        num_updates: int,
        num_examples: int,
        now: datetime,
    ) -> None:
        """Note the round's aggregated model in its timeline (`num_updates`: the updates aggregated)."""
        await self.session.execute(
            update(TrainingRound)
            .where(TrainingRound.training_id == training_id, TrainingRound.round == round_)
            .values(aggregated_at=now, model_id=model_id, num_updates=num_updates, num_examples=num_examples)
        )

    async def overdue(self, now: datetime, limit: int = 100) -> Sequence[UUID]:
        """Ongoing trainings whose phase deadline has passed."""
        rows = await self.session.scalars(
            select(Training.id)
            .where(Training.deadline_at.is_not(None), Training.deadline_at <= now)
            .order_by(Training.deadline_at)
            .limit(limit)
        )
        return rows.all()


def view_of(training: Training, participants: int) -> TrainingView:
    """The machine's view of a training row."""
    return TrainingView(
        id=training.id,
        state=training.state,
        phase=training.phase,
        round=training.round,
        rounds=training.rounds,
        participants=participants,
        min_clients=training.min_clients,
        round_timeout_s=training.round_timeout_s,
        current_model_id=training.current_model_id,
        skip_model_tests=training.skip_model_tests,
        model_test_after_each_round=training.model_test_after_each_round,
        deadline_at=training.deadline_at,
        client_config=training.client_config(),
    )
