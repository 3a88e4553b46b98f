"""Concurrency guards on PostgreSQL: the training version compare-and-set and the FOR UPDATE row lock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from services.orchestrator.machine import Step
from services.orchestrator.repository import ConcurrentTransition, TrainingRepository
from shared.db.models import Model, Principal, Training
from shared.enums import Role, RoundPhase, TrainingState
from tests.db.conftest import lock_waiters, wait_until

pytestmark = pytest.mark.integration


async def new_training(runtime) -> UUID:
    """An INITIAL training with its owner and model; returns its id."""
    owner, model, training = uuid4(), uuid4(), uuid4()
    async with runtime.uow() as uow:
        uow.session.add(Principal(id=owner, name="owner", role=Role.ACTOR, token_hash=uuid4().hex))
        await uow.session.flush()
        uow.session.add(
            Model(id=model, owner_id=owner, blob_key="sha256/m", digest="m", size_bytes=1, spec={})
        )
        await uow.session.flush()
        uow.session.add(
            Training(
                id=training,
                owner_id=owner,
                initial_model_id=model,
                current_model_id=model,
                aggregation="fedavg",
                rounds=2,
                min_clients=1,
                round_timeout_s=60.0,
            )
        )
    return training


def start(training: Training) -> Step:
    """The step that starts a training's first round."""
    return Step(
        state=TrainingState.ONGOING,
        phase=RoundPhase.COLLECTING,
        round=1,
        deadline_at=None,
        current_model_id=training.current_model_id,
        round_started=True,
    )


async def test_stale_version_is_refused(pg_runtime):
    """Applying a step to a training whose version moved on raises ConcurrentTransition, writing nothing."""
    training_id = await new_training(pg_runtime)
    async with pg_runtime.uow() as uow:
        stale, _ = await TrainingRepository(uow.session).load(training_id)
    async with pg_runtime.uow() as uow:
        repo = TrainingRepository(uow.session)
        fresh, _ = await repo.load(training_id)
        await repo.apply(fresh, start(fresh), datetime.now(UTC))

    async def apply_stale() -> None:
        async with pg_runtime.uow() as uow:
            await TrainingRepository(uow.session).apply(stale, start(stale), datetime.now(UTC))

    with pytest.raises(ConcurrentTransition):
        await apply_stale()
    async with pg_runtime.uow() as uow:
        row, view = await TrainingRepository(uow.session).load(training_id)
    assert (row.version, view.state, view.round) == (1, TrainingState.ONGOING, 1)


async def test_load_for_update_serialises_transitions(pg_runtime):
    """A second load of a training waits for the first transaction, then sees its committed transition."""
    training_id = await new_training(pg_runtime)
    async with pg_runtime.uow() as first:
        repo = TrainingRepository(first.session)
        training, _ = await repo.load(training_id)

        async def second_load() -> tuple[int, TrainingState]:
            async with pg_runtime.uow() as uow:
                row, view = await TrainingRepository(uow.session).load(training_id)
                return row.version, view.state

        second = asyncio.create_task(second_load())

        async def second_waits() -> bool:
            return await lock_waiters(pg_runtime) == 1

        await wait_until(second_waits, "the second load to wait on the row lock")
        assert not second.done()
        await repo.apply(training, start(training), datetime.now(UTC))
    assert await second == (1, TrainingState.ONGOING)


async def test_concurrently_handled_updates_make_one_aggregation_job(pg_runtime):
    """On PostgreSQL: ten update announcements handled at once give one transition and one job."""
    from tests.orchestrator.test_handlers import concurrent_updates_make_one_job

    await pg_runtime.relay.stop()
    await concurrent_updates_make_one_job(pg_runtime)


async def _client_of(runtime, training_id: UUID) -> UUID:
    """A new client principal (updates need one as their foreign key)."""
    client = uuid4()
    async with runtime.uow() as uow:
        uow.session.add(
            Principal(id=client, name=f"client-{client}", role=Role.CLIENT, token_hash=client.hex)
        )
    return client


def _update_row(training_id: UUID, client_id: UUID, round_: int = 1) -> dict[str, object]:
    return {
        "id": uuid4(),
        "training_id": training_id,
        "round": round_,
        "client_id": client_id,
        "blob_key": f"update/{uuid4()}",
        "digest": "d",
        "num_examples": 3,
        "metrics": {},
        "received_at": datetime.now(UTC),
    }


async def test_an_update_is_inserted_only_while_its_round_collects(pg_runtime):
    """The API's one-statement insert on PostgreSQL: a row while the round collects (none for a
    repeat), none once the training has moved on; and its share lock on the training holds the
    orchestrator's transition back until the upload commits."""
    from services.api.service import insert_if_open
    from shared.db.models import ClientUpdate

    statement = insert_if_open("postgresql", ClientUpdate).returning(ClientUpdate.id)

    training_id = await new_training(pg_runtime)
    alice, bob = await _client_of(pg_runtime, training_id), await _client_of(pg_runtime, training_id)

    async def insert(row: dict[str, object]) -> UUID | None:
        async with pg_runtime.uow() as uow:
            return await uow.session.scalar(statement, row)

    assert await insert(_update_row(training_id, alice)) is None  # INITIAL: no open round
    async with pg_runtime.uow() as uow:
        repo = TrainingRepository(uow.session)
        training, _ = await repo.load(training_id)
        await repo.apply(training, start(training), datetime.now(UTC))
    first = _update_row(training_id, alice)
    assert await insert(first) == first["id"]
    assert await insert(_update_row(training_id, alice)) is None  # a repeat
    assert await insert(_update_row(training_id, bob, round_=2)) is None  # not the open round

    async with pg_runtime.uow() as upload:
        row = _update_row(training_id, bob)
        assert await upload.session.scalar(statement, row) == row["id"]

        async def close_round() -> int:
            async with pg_runtime.uow() as uow:
                repo = TrainingRepository(uow.session)
                await repo.load(training_id)  # FOR UPDATE, as a transition does
                return await repo.count_updates(training_id, 1)

        closing = asyncio.create_task(close_round())

        async def closing_waits() -> bool:
            return await lock_waiters(pg_runtime) == 1

        await wait_until(closing_waits, "the transition to wait on the upload's share lock")
        assert not closing.done()
    assert await closing == 2  # it counted bob's update, committed before it could read
