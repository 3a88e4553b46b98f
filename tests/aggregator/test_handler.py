"""The aggregation handler end to end: an AggregateRound envelope on the in-memory bus, through the real
Consumer, to a Model row, a stored blob and a ModelAggregated (or AggregationFailed) on the bus."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from uuid import UUID, uuid4

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from services.aggregator.handlers import round_model_id
from services.aggregator.service import Aggregator
from shared.blobs import content_key, update_key
from shared.bus import Envelope, envelope_for
from shared.codec import decode_message, decode_tensors, encode_tensors, packb
from shared.db.models import ClientUpdate, InboxMessage, Model, Principal, Training
from shared.enums import Role, RoundPhase, TrainingState
from shared.events import MESSAGE_TYPES, AggregateRound, AggregationFailed, ModelAggregated, UpdateRef
from shared.runtime import Runtime
from shared.tensors import records_to_state_dict, state_dict_to_records
from tests.aggregator.fakes import GatedBlobStore

DEADLINE_S = 10.0


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def model_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small model's state dict, buffers included."""
    return {
        "fc.weight": torch.randn(4, 3, generator=gen),
        "fc.bias": torch.randn(4, generator=gen),
        "bn.running_mean": torch.randn(4, generator=gen, dtype=torch.float64),
        "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen, dtype=torch.int64),
        "mask": torch.randint(0, 2, (5,), generator=gen).to(torch.bool),
    }


def encode(state: dict[str, torch.Tensor]) -> bytes:
    """The canonical blob of a state dict."""
    return encode_tensors(state_dict_to_records(state))


@dataclass
class Round:
    """A training in its aggregating phase with its updates stored."""

    owner_id: UUID
    training_id: UUID
    base: dict[str, torch.Tensor]
    updates: list[dict[str, torch.Tensor]]
    weights: list[int]
    job: AggregateRound


async def seed_round(runtime: Runtime, *, delete_updates_after: bool = True, seed: int = 0) -> Round:
    """Create a principal, a model, a training and three client updates, rows and blobs."""
    gen = torch.Generator().manual_seed(seed)
    owner = Principal(id=uuid4(), name="owner", role=Role.ACTOR, token_hash=uuid4().hex)
    clients = [
        Principal(id=uuid4(), name=f"client-{i}", role=Role.CLIENT, token_hash=uuid4().hex) for i in range(3)
    ]
    base = model_state(gen)
    base_bytes = encode(base)
    base_key, base_digest = content_key(base_bytes)
    await runtime.blobs.put(base_key, base_bytes)
    model = Model(
        id=uuid4(),
        name="initial",
        owner_id=owner.id,
        blob_key=base_key,
        digest=base_digest,
        size_bytes=len(base_bytes),
        spec={name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in base.items()},
    )
    training = Training(
        id=uuid4(),
        owner_id=owner.id,
        initial_model_id=model.id,
        current_model_id=model.id,
        aggregation="fedavg",
        rounds=3,
        min_clients=3,
        round_timeout_s=600.0,
        state=TrainingState.ONGOING,
        phase=RoundPhase.AGGREGATING,
        round=1,
    )
    updates, weights, rows, refs = [], [12, 30, 7], [], []
    for client, weight in zip(clients, weights, strict=True):
        state = model_state(gen)
        data = encode(state)
        update_id = uuid4()
        await runtime.blobs.put(update_key(update_id), data)
        rows.append(
            ClientUpdate(
                id=update_id,
                training_id=training.id,
                round=1,
                client_id=client.id,
                blob_key=update_key(update_id),
                digest=hashlib.sha256(data).hexdigest(),
                num_examples=weight,
            )
        )
        refs.append(
            UpdateRef(
                update_id=update_id, client_id=client.id, blob_key=update_key(update_id), num_examples=weight
            )
        )
        updates.append(state)
    async with runtime.uow() as uow:
        # Without relationship()s the session does not order inserts by foreign key: flush per table.
        for batch in ([owner, *clients], [model], [training], rows):
            uow.session.add_all(batch)
            await uow.session.flush()
    job = AggregateRound(
        job_id=uuid4(),
        training_id=training.id,
        round=1,
        method="fedavg",
        base_model_id=model.id,
        base_blob_key=base_key,
        updates=tuple(refs),
        delete_updates_after=delete_updates_after,
    )
    return Round(owner.id, training.id, base, updates, weights, job)


class Outcomes:
    """What the aggregator announced: a test queue bound to its two result events."""

    def __init__(self) -> None:
        self.aggregated: list[ModelAggregated] = []
        self.failed: list[AggregationFailed] = []

    async def collect(self, envelope: Envelope) -> None:
        """Decode and keep one announcement."""
        message = decode_message(MESSAGE_TYPES[envelope.type], envelope.body)
        if isinstance(message, ModelAggregated):
            self.aggregated.append(message)
        elif isinstance(message, AggregationFailed):
            self.failed.append(message)


@pytest.fixture
async def outcomes(runtime) -> Outcomes:
    """Collects every ModelAggregated and AggregationFailed published on the bus."""
    collected = Outcomes()
    await runtime.bus.subscribe(
        f"test-outcomes-{uuid4()}",
        [ModelAggregated.routing_key, AggregationFailed.routing_key],
        collected.collect,
    )
    return collected


@pytest.fixture
async def aggregator(settings, runtime):
    """The aggregator service consuming from the runtime's bus (through the real Consumer)."""
    service = Aggregator(settings, runtime)
    await service.start()
    yield service
    await service.stop()


async def settle(runtime: Runtime, outcomes: Outcomes) -> None:
    """Wait until everything published before has been handled: a sentinel job goes through last.

    The aggregator's queue is first in, first out with one consumer, and the outbox relay publishes
    in commit order, so the sentinel's failure arrives after any announcement of earlier jobs.
    """
    sentinel = AggregateRound(
        job_id=uuid4(),
        training_id=uuid4(),
        round=1,
        method="sentinel-method",
        base_model_id=uuid4(),
        base_blob_key="sha256/none",
        updates=(),
    )
    await runtime.bus.publish([envelope_for(sentinel)])

    async def sentinel_failed() -> bool:
        return any(f.job_id == sentinel.job_id for f in outcomes.failed)

    await wait_for(sentinel_failed, "the sentinel job")
    outcomes.failed = [f for f in outcomes.failed if f.job_id != sentinel.job_id]


async def count_models(runtime: Runtime, training_id: UUID) -> int:
    """How many Model rows the training has."""
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(func.count()).where(Model.training_id == training_id)) or 0


async def model_of(runtime: Runtime, training_id: UUID) -> Model | None:
    """The training's round-1 model row, if any."""
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(Model).where(Model.training_id == training_id))


def expected_average(r: Round) -> dict[str, np.ndarray]:
    """The numpy float64 weighted mean of the round's updates."""
    total = sum(r.weights)
    return {
        name: np.asarray(
            sum(w * u[name].to(torch.float64).numpy() for u, w in zip(r.updates, r.weights, strict=True))
            / total
        )
        for name in r.base
    }


async def test_aggregates_stores_announces_and_deletes_update_blobs(runtime, aggregator, outcomes):
    """The new model's blob decodes to the weighted mean; its row, event and deletions follow."""
    r = await seed_round(runtime, delete_updates_after=True)
    await runtime.bus.publish([envelope_for(r.job)])

    async def model_exists() -> bool:
        return await model_of(runtime, r.training_id) is not None

    await wait_for(model_exists, "the Model row")
    model = await model_of(runtime, r.training_id)
    assert model is not None
    assert model.id == round_model_id(r.training_id, 1)
    assert (model.round, model.name, model.owner_id) == (1, "round-1", r.owner_id)

    data = await runtime.blobs.get(model.blob_key)
    assert (model.blob_key, model.digest) == content_key(data)
    assert model.size_bytes == len(data)
    records = decode_tensors(data)
    assert [rec.name for rec in records] == list(r.base)
    assert model.spec == {rec.name: [rec.dtype, list(rec.shape)] for rec in records}
    result = records_to_state_dict(records)
    expected = expected_average(r)
    np.testing.assert_allclose(result["fc.weight"].numpy(), expected["fc.weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["fc.bias"].numpy(), expected["fc.bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["bn.running_mean"].numpy(), expected["bn.running_mean"], rtol=1e-12)
    assert result["bn.num_batches_tracked"].item() == np.round(expected["bn.num_batches_tracked"])
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    np.testing.assert_array_equal(result["mask"].numpy(), expected["mask"] >= 0.5)

    async def announced() -> bool:
        return bool(outcomes.aggregated)

    await wait_for(announced, "ModelAggregated")
    assert outcomes.aggregated == [
        ModelAggregated(
            job_id=r.job.job_id,
            training_id=r.training_id,
            round=1,
            model_id=model.id,
            blob_key=model.blob_key,
            num_updates=3,
            num_examples=sum(r.weights),
        )
    ]

    async def update_blobs_gone() -> bool:
        return not any([await runtime.blobs.exists(ref.blob_key) for ref in r.job.updates])

    await wait_for(update_blobs_gone, "the update blobs' deletion")
    async with runtime.uow() as uow:
        marks = (await uow.session.scalars(select(ClientUpdate.blob_deleted_at))).all()
    assert len(marks) == 3
    assert all(mark is not None for mark in marks)
    assert await runtime.blobs.exists(r.job.base_blob_key)
    assert outcomes.failed == []


async def test_keeps_update_blobs_when_not_asked_to_delete(runtime, aggregator, outcomes):
    """delete_updates_after=False leaves the blobs and the rows' deletion marks alone."""
    r = await seed_round(runtime, delete_updates_after=False)
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    assert len(outcomes.aggregated) == 1
    for ref in r.job.updates:
        assert await runtime.blobs.exists(ref.blob_key)
    async with runtime.uow() as uow:
        marks = (await uow.session.scalars(select(ClientUpdate.blob_deleted_at))).all()
    assert marks == [None, None, None]


async def test_same_envelope_twice_makes_one_model(runtime, aggregator, outcomes):
    """A redelivered envelope (same message id) is dropped by the inbox: one row, one event."""
    r = await seed_round(runtime)
    envelope = envelope_for(r.job)
    await runtime.bus.publish([envelope, envelope])
    await settle(runtime, outcomes)
    assert await count_models(runtime, r.training_id) == 1
    assert [m.job_id for m in outcomes.aggregated] == [r.job.job_id]


async def test_same_job_in_a_new_envelope_makes_one_model(runtime, aggregator, outcomes):
    """The job re-sent under a new message id passes the inbox but finds its model and emits nothing."""
    r = await seed_round(runtime, delete_updates_after=False)
    first, again = envelope_for(r.job), envelope_for(r.job)
    await runtime.bus.publish([first, again])
    await settle(runtime, outcomes)
    assert await count_models(runtime, r.training_id) == 1
    assert len(outcomes.aggregated) == 1
    async with runtime.uow() as uow:
        handled = set((await uow.session.scalars(select(InboxMessage.message_id))).all())
    assert {first.message_id, again.message_id} <= handled


async def test_missing_update_blob_fails_the_job_naming_the_update(runtime, aggregator, outcomes):
    """A deleted update blob is permanent: AggregationFailed names the update, nothing is stored."""
    r = await seed_round(runtime)
    gone = r.job.updates[1]
    await runtime.blobs.delete(gone.blob_key)
    await runtime.bus.publish([envelope_for(r.job)])

    async def failed() -> bool:
        return bool(outcomes.failed)

    await wait_for(failed, "AggregationFailed")
    (failure,) = outcomes.failed
    assert (failure.job_id, failure.training_id, failure.round) == (r.job.job_id, r.training_id, 1)
    assert str(gone.update_id) in failure.reason
    assert "does not exist" in failure.reason
    await settle(runtime, outcomes)
    assert await count_models(runtime, r.training_id) == 0
    assert outcomes.aggregated == []
    for ref in (r.job.updates[0], r.job.updates[2]):
        assert await runtime.blobs.exists(ref.blob_key)


def _nan_update(state: dict[str, torch.Tensor]) -> bytes:
    poisoned = dict(state)
    poisoned["fc.bias"] = torch.full((4,), float("nan"))
    return encode(poisoned)


def _reshaped_update(state: dict[str, torch.Tensor]) -> bytes:
    reshaped = dict(state)
    reshaped["fc.weight"] = torch.zeros(3, 4)
    return encode(reshaped)


@pytest.mark.parametrize(
    ("corrupt", "says"),
    [
        (lambda state: b"\xc1 not msgpack", "MalformedPayload"),
        (
            lambda state: packb({"tensors": {"fc.weight": {"dtype": "float8", "shape": [1], "data": b"x"}}}),
            "float8",
        ),
        (_nan_update, "NonFiniteValues"),
        (_reshaped_update, "fc.weight"),
    ],
    ids=["not-msgpack", "unknown-dtype", "nan", "wrong-shape"],
)
async def test_undecodable_or_unfit_update_fails_the_job(runtime, aggregator, outcomes, corrupt, says):
    """An update blob that cannot be used is permanent: AggregationFailed names the update and why."""
    r = await seed_round(runtime)
    bad = r.job.updates[2]
    await runtime.blobs.delete(bad.blob_key)
    await runtime.blobs.put(bad.blob_key, corrupt(r.updates[2]))
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    (failure,) = outcomes.failed
    assert str(bad.update_id) in failure.reason
    assert says in failure.reason
    assert await count_models(runtime, r.training_id) == 0


async def test_unknown_method_and_empty_job_fail(runtime, aggregator, outcomes):
    """A method no registry entry names, or a job without updates, ends in AggregationFailed."""
    r = await seed_round(runtime)
    unknown = replace(r.job, job_id=uuid4(), method="krum")
    empty = replace(r.job, job_id=uuid4(), updates=())
    await runtime.bus.publish([envelope_for(unknown), envelope_for(empty)])
    await settle(runtime, outcomes)
    reasons = {f.job_id: f.reason for f in outcomes.failed}
    assert "'krum'" in reasons[unknown.job_id]
    assert "no updates" in reasons[empty.job_id]
    assert await count_models(runtime, r.training_id) == 0


async def test_missing_base_model_blob_fails_the_job(runtime, aggregator, outcomes):
    """Without the base model nothing can be averaged: AggregationFailed names the base model."""
    r = await seed_round(runtime)
    await runtime.blobs.delete(r.job.base_blob_key)
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    (failure,) = outcomes.failed
    assert str(r.job.base_model_id) in failure.reason


async def test_other_writers_commit_while_a_job_runs(settings, runtime, outcomes):
    """A running aggregation holds no write lock: another unit of work commits meanwhile (SQLite)."""
    gated = GatedBlobStore(settings.blob_path)
    runtime.blobs = gated
    r = await seed_round(runtime)
    gated.gated.add(r.job.updates[1].blob_key)
    service = Aggregator(settings, runtime)
    await service.start()
    try:
        await runtime.bus.publish([envelope_for(r.job)])
        await asyncio.wait_for(gated.entered.wait(), timeout=DEADLINE_S)

        async def write_elsewhere() -> None:
            async with runtime.uow() as uow:
                uow.session.add(Principal(id=uuid4(), name="late", role=Role.CLIENT, token_hash=uuid4().hex))

        # Far below SQLite's 30 s busy timeout: a held lock shows up as this timing out.
        await asyncio.wait_for(write_elsewhere(), timeout=5)
        gated.release.set()
        await wait_for(lambda: _announced(outcomes), "ModelAggregated")
        assert gated.entries == 1
        assert await count_models(runtime, r.training_id) == 1
    finally:
        gated.release.set()
        await service.stop()


async def _announced(outcomes: Outcomes) -> bool:
    return bool(outcomes.aggregated)
