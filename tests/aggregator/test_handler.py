"""The aggregation handler end to end: an AggregateRound envelope on the in-memory bus, through the real
Consumer, to a Model row, a stored blob and a ModelAggregated (or AggregationFailed) on the bus."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from services.aggregator import engine, handlers, pipeline
from services.aggregator.handlers import round_model_id
from services.aggregator.service import Aggregator
from shared.aggregation import AggregationMethod
from shared.blobs import content_key, update_key
from shared.bus import Envelope, envelope_for
from shared.codec import decode_message, decode_tensors, encode_tensors, packb
from shared.db.models import ClientUpdate, InboxMessage, Model, ModelMember, Principal, Training
from shared.enums import Role, RoundPhase, TrainingState
from shared.events import MESSAGE_TYPES, AggregateRound, AggregationFailed, ModelAggregated, UpdateRef
from shared.runtime import Runtime
from shared.tensors import records_to_state_dict, state_dict_to_records
from tests.aggregator.fakes import GatedBlobStore, KeepAll

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


def float32_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A small model the numpy engine takes: float32, integer and bool tensors (no float64)."""
    state = model_state(gen)
    state["bn.running_mean"] = state["bn.running_mean"].float()
    return state


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


async def seed_round(
    runtime: Runtime,
    *,
    delete_updates_after: bool = True,
    seed: int = 0,
    make_state: Callable[[torch.Generator], dict[str, torch.Tensor]] = model_state,
) -> Round:
    """Create a principal, a model, a training and three client updates, rows and blobs.

    The default model has a float64 tensor, so its FedAvg rounds go to the torch engine.
    """
    gen = torch.Generator().manual_seed(seed)
    owner = Principal(id=uuid4(), name="owner", role=Role.ACTOR, token_hash=uuid4().hex)
    clients = [
        Principal(id=uuid4(), name=f"client-{i}", role=Role.CLIENT, token_hash=uuid4().hex) for i in range(3)
    ]
    base = make_state(gen)
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
        state = make_state(gen)
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


async def rejected_reasons(runtime: Runtime, training_id: UUID) -> dict[UUID, str | None]:
    """Each update row's rejection reason, by update id."""
    async with runtime.uow() as uow:
        rows = await uow.session.execute(
            select(ClientUpdate.id, ClientUpdate.rejected_reason).where(
                ClientUpdate.training_id == training_id
            )
        )
        return {update_id: reason for update_id, reason in rows}


async def test_missing_update_blob_rejects_that_update_and_the_round_goes_on(runtime, aggregator, outcomes):
    """A deleted update blob leaves that update out with its reason; the others make the model."""
    r = await seed_round(runtime, delete_updates_after=False)
    gone = r.job.updates[1]
    await runtime.blobs.delete(gone.blob_key)
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    assert outcomes.failed == []
    (done,) = outcomes.aggregated
    assert (done.num_updates, done.num_rejected, done.rejected) == (2, 1, (gone.update_id,))
    assert done.num_examples == r.weights[0] + r.weights[2]
    reasons = await rejected_reasons(runtime, r.training_id)
    assert "does not exist" in (reasons[gone.update_id] or "")
    assert [reasons[ref.update_id] for ref in (r.job.updates[0], r.job.updates[2])] == [None, None]
    model = await model_of(runtime, r.training_id)
    assert model is not None
    result = records_to_state_dict(decode_tensors(await runtime.blobs.get(model.blob_key)))
    kept = replace(r, updates=[r.updates[0], r.updates[2]], weights=[r.weights[0], r.weights[2]])
    np.testing.assert_allclose(result["fc.weight"].numpy(), expected_average(kept)["fc.weight"], rtol=1e-5)


def _nan_update(state: dict[str, torch.Tensor]) -> bytes:
    poisoned = dict(state)
    poisoned["fc.bias"] = torch.full((4,), float("nan"))
    return encode(poisoned)


def _reshaped_update(state: dict[str, torch.Tensor]) -> bytes:
    reshaped = dict(state)
    reshaped["fc.weight"] = torch.zeros(3, 4)
    return encode(reshaped)


def _retyped_update(state: dict[str, torch.Tensor]) -> bytes:
    retyped = dict(state)
    retyped["bn.running_mean"] = retyped["bn.running_mean"].to(torch.float32)
    return encode(retyped)


def _short_update(state: dict[str, torch.Tensor]) -> bytes:
    return encode({k: v for k, v in state.items() if k != "mask"})


@pytest.mark.parametrize(
    ("corrupt", "says"),
    [
        (lambda state: b"\xc1 not msgpack", "MalformedPayload"),
        (
            lambda state: packb({"tensors": {"fc.weight": {"dtype": "float8", "shape": [1], "data": b"x"}}}),
            "float8",
        ),
        (_nan_update, "NaN or Inf"),
        (_reshaped_update, "'fc.weight': shape [3, 4]"),
        (_retyped_update, "'bn.running_mean': dtype float32"),
        (_short_update, "missing tensor names: mask"),
    ],
    ids=["not-msgpack", "unknown-dtype", "nan", "wrong-shape", "wrong-dtype", "missing-tensor"],
)
async def test_undecodable_or_unfit_update_is_rejected_with_its_reason(
    runtime, aggregator, outcomes, corrupt, says
):
    """An update blob that cannot be used is left out, its reason kept on its row; the round completes."""
    r = await seed_round(runtime)
    bad = r.job.updates[2]
    await runtime.blobs.delete(bad.blob_key)
    await runtime.blobs.put(bad.blob_key, corrupt(r.updates[2]))
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    assert outcomes.failed == []
    (done,) = outcomes.aggregated
    assert (done.num_updates, done.num_rejected, done.rejected) == (2, 1, (bad.update_id,))
    reasons = await rejected_reasons(runtime, r.training_id)
    assert says in (reasons[bad.update_id] or "")
    assert await count_models(runtime, r.training_id) == 1


async def test_every_update_rejected_fails_the_job_and_keeps_the_reasons(runtime, aggregator, outcomes):
    """With no update left the round cannot be aggregated: AggregationFailed lists each reason."""
    r = await seed_round(runtime)
    for ref, state in zip(r.job.updates, r.updates, strict=True):
        await runtime.blobs.delete(ref.blob_key)
        await runtime.blobs.put(ref.blob_key, _nan_update(state))
    await runtime.bus.publish([envelope_for(r.job)])
    await settle(runtime, outcomes)
    (failure,) = outcomes.failed
    assert "no update could be aggregated" in failure.reason
    assert all(str(ref.update_id) in failure.reason for ref in r.job.updates)
    reasons = await rejected_reasons(runtime, r.training_id)
    assert all("NaN or Inf" in (reason or "") for reason in reasons.values())
    assert await count_models(runtime, r.training_id) == 0
    # The job failed, so nothing was aggregated and nothing deleted.
    for ref in r.job.updates:
        assert await runtime.blobs.exists(ref.blob_key)


async def test_unknown_method_and_empty_job_fail(runtime, aggregator, outcomes):
    """A method no AggregationMethod names, or a job without updates, ends in AggregationFailed."""
    r = await seed_round(runtime)
    unknown = replace(r.job, job_id=uuid4(), method="no-such-method")
    empty = replace(r.job, job_id=uuid4(), updates=())
    await runtime.bus.publish([envelope_for(unknown), envelope_for(empty)])
    await settle(runtime, outcomes)
    reasons = {f.job_id: f.reason for f in outcomes.failed}
    assert "'no-such-method'" in reasons[unknown.job_id]
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
    await runtime.blobs.close()  # the runtime's own store (its database pool) gives way
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


async def test_server_state_and_record_are_kept_with_the_model(runtime, aggregator, outcomes):
    """FedAdam's moments go to a tensor blob the model row names; the next round's job reads them."""
    r = await seed_round(runtime, delete_updates_after=False)
    await runtime.bus.publish([envelope_for(replace(r.job, method="fedadam", params={"server_lr": 0.5}))])
    await settle(runtime, outcomes)
    model = await model_of(runtime, r.training_id)
    assert model is not None and model.state_blob_key is not None
    assert model.record == {}
    state = records_to_state_dict(decode_tensors(await runtime.blobs.get(model.state_blob_key)))
    assert {"m/fc.weight", "v/fc.weight"} <= set(state)
    assert state["m/fc.weight"].shape == r.base["fc.weight"].shape

    round2 = replace(
        r.job,
        job_id=uuid4(),
        round=2,
        method="fedadam",
        params={"server_lr": 0.5},
        base_model_id=model.id,
        base_blob_key=model.blob_key,
        base_state_blob_key=model.state_blob_key,
    )
    await runtime.bus.publish([envelope_for(round2)])
    await settle(runtime, outcomes)
    assert [m.round for m in outcomes.aggregated] == [1, 2]
    async with runtime.uow() as uow:
        second = await uow.session.get(Model, round_model_id(r.training_id, 2))
    assert second is not None and second.state_blob_key not in (None, model.state_blob_key)
    later = records_to_state_dict(decode_tensors(await runtime.blobs.get(second.state_blob_key)))
    # Adam's first moment after two rounds: beta1 * m1 + (1 - beta1) * d2, so it is not m1 scaled.
    assert not torch.equal(later["m/fc.weight"], state["m/fc.weight"])


async def test_ensemble_members_are_stored_in_the_order_of_their_updates(
    runtime, aggregator, outcomes, monkeypatch
):
    """Each member is a blob with a row naming its update and client, in the order aggregated."""
    monkeypatch.setattr(pipeline, "METHODS", {**pipeline.METHODS, AggregationMethod.ENSEMBLE: KeepAll})
    r = await seed_round(runtime, delete_updates_after=False)
    await runtime.bus.publish([envelope_for(replace(r.job, method="ensemble"))])
    await settle(runtime, outcomes)
    model = await model_of(runtime, r.training_id)
    assert model is not None and model.record == {"members": 3}
    async with runtime.uow() as uow:
        members = (
            await uow.session.scalars(
                select(ModelMember).where(ModelMember.model_id == model.id).order_by(ModelMember.index)
            )
        ).all()
    assert [(m.index, m.update_id, m.client_id) for m in members] == [
        (i, ref.update_id, ref.client_id) for i, ref in enumerate(r.job.updates)
    ]
    for m, sent in zip(members, r.updates, strict=True):
        data = await runtime.blobs.get(m.blob_key)
        assert (m.blob_key, m.digest) == content_key(data) and m.size_bytes == len(data)
        stored = records_to_state_dict(decode_tensors(data))
        assert list(stored) == list(r.base)
        assert all(torch.equal(stored[k], sent[k]) for k in sent)


async def test_an_update_over_the_norm_bound_is_rejected(runtime, aggregator, outcomes):
    """max_update_norm: a client's scaled update is left out with the norm in its reason."""
    r = await seed_round(runtime, delete_updates_after=False)
    big = r.job.updates[0]
    scaled = {k: v * 1000 if v.dtype.is_floating_point else v for k, v in r.updates[0].items()}
    await runtime.blobs.delete(big.blob_key)
    await runtime.blobs.put(big.blob_key, encode(scaled))
    await runtime.bus.publish([envelope_for(replace(r.job, max_update_norm=100.0))])
    await settle(runtime, outcomes)
    (done,) = outcomes.aggregated
    assert done.rejected == (big.update_id,)
    reason = (await rejected_reasons(runtime, r.training_id))[big.update_id] or ""
    assert "exceeds max_update_norm 100" in reason


async def test_a_redelivered_job_with_members_and_a_rejection_has_one_effect(
    runtime, aggregator, outcomes, monkeypatch
):
    """The same ensemble job twice (new envelopes): one model, its members and its rejection once."""
    monkeypatch.setattr(pipeline, "METHODS", {**pipeline.METHODS, AggregationMethod.ENSEMBLE: KeepAll})
    r = await seed_round(runtime, delete_updates_after=False)
    bad = r.job.updates[0]
    await runtime.blobs.delete(bad.blob_key)
    await runtime.blobs.put(bad.blob_key, _nan_update(r.updates[0]))
    job = replace(r.job, method="ensemble")
    await runtime.bus.publish([envelope_for(job), envelope_for(job)])
    await settle(runtime, outcomes)
    assert [m.rejected for m in outcomes.aggregated] == [(bad.update_id,)]
    assert await count_models(runtime, r.training_id) == 1
    async with runtime.uow() as uow:
        members = (await uow.session.scalars(select(ModelMember.update_id))).all()
    assert sorted(map(str, members)) == sorted(str(ref.update_id) for ref in r.job.updates[1:])


async def one_stored_round(settings, runtime: Runtime, outcomes: Outcomes) -> dict[str, torch.Tensor]:
    """One seeded round through an aggregator with `settings`; its stored model, checked against
    the expected sample-weighted average."""
    service = Aggregator(settings, runtime)
    await service.start()
    try:
        r = await seed_round(runtime, delete_updates_after=False)
        await runtime.bus.publish([envelope_for(r.job)])
        await settle(runtime, outcomes)
    finally:
        await service.stop()
    model = await model_of(runtime, r.training_id)
    assert model is not None
    result = records_to_state_dict(decode_tensors(await runtime.blobs.get(model.blob_key)))
    expected = expected_average(r)
    np.testing.assert_allclose(result["fc.weight"].numpy(), expected["fc.weight"], rtol=1e-5, atol=1e-6)
    return result


@pytest.mark.parametrize("small_round_bytes", [1 << 20, 0])
async def test_small_fedavg_rounds_are_averaged_without_torch_to_the_same_model(
    settings, runtime, outcomes, monkeypatch, small_round_bytes
):
    """A float32 FedAvg round under FEDHUB_AGGREGATOR_SMALL_ROUND_BYTES never builds the torch engine
    (at 0 it does); either way the stored model is the torch pipeline's, byte for byte (its content
    address), and the float64 weighted mean to float32 precision."""
    engines: list[handlers.LazyEngine] = []
    real_engine = handlers.LazyEngine

    def noting_engine(s: Any) -> handlers.LazyEngine:
        engines.append(real_engine(s))
        return engines[-1]

    monkeypatch.setattr(handlers, "LazyEngine", noting_engine)
    engine_name = "torch" if small_round_bytes == 0 else "numpy"
    recorded = handlers.ROUNDS.value(engine=engine_name)
    service = Aggregator(settings.model_copy(update={"small_round_bytes": small_round_bytes}), runtime)
    await service.start()
    try:
        r = await seed_round(runtime, delete_updates_after=False, seed=11, make_state=float32_state)
        await runtime.bus.publish([envelope_for(r.job)])
        await settle(runtime, outcomes)
    finally:
        await service.stop()
    assert [e.loaded for e in engines] == [small_round_bytes == 0]
    assert handlers.ROUNDS.value(engine=engine_name) == recorded + 1
    model = await model_of(runtime, r.training_id)
    assert model is not None
    by_torch = await pipeline.aggregate_round(r.job, runtime.blobs, torch.device("cpu"))
    assert model.blob_key == content_key(encode(by_torch.aggregate.model))[0]
    result = records_to_state_dict(decode_tensors(await runtime.blobs.get(model.blob_key)))
    expected = expected_average(r)
    for name in ("fc.weight", "bn.running_mean"):
        np.testing.assert_allclose(result[name].numpy(), expected[name], rtol=1e-5, atol=1e-6)
    assert [m.num_updates for m in outcomes.aggregated] == [3]


async def test_the_torch_engine_is_built_once_and_off_the_event_loop(settings, monkeypatch):
    """Rounds asking for the torch engine at the same time get one engine, built in a worker thread:
    importing torch on the loop would stop every other task of the process for seconds."""
    built: list[int] = []

    class NotingEngine(engine.TorchEngine):
        def __init__(self, s: Any) -> None:
            built.append(threading.get_ident())
            super().__init__(s)

    monkeypatch.setattr(engine, "TorchEngine", NotingEngine)
    lazy = handlers.LazyEngine(settings)
    assert not lazy.loaded
    first, second = await asyncio.gather(lazy.get(), lazy.get())
    assert first is second and isinstance(first, NotingEngine) and lazy.loaded
    assert len(built) == 1 and built[0] != threading.get_ident()
    assert await lazy.get() is first


@pytest.mark.parametrize("frozen", [0, 120_000])
async def test_a_process_that_froze_its_startup_heap_freezes_torch_too(settings, monkeypatch, frozen):
    """Loading the torch engine in a serving process (start-up heap frozen) freezes torch's objects
    as well, so full collections do not walk them; a process that froze nothing is left alone."""
    freezes: list[bool] = []
    monkeypatch.setattr(handlers.gc, "get_freeze_count", lambda: frozen)
    monkeypatch.setattr(handlers.gc, "freeze", lambda: freezes.append(True))
    await handlers.LazyEngine(settings).get()
    assert freezes == ([True] if frozen else [])


@pytest.mark.parametrize("window", [1, 3])
async def test_the_fold_window_setting_reaches_the_round(settings, runtime, outcomes, monkeypatch, window):
    """FEDHUB_AGGREGATOR_FOLD_WINDOW is what the handler hands the pipeline; the model is the same."""
    seen: list[int] = []
    real_open = pipeline.open_round

    async def open_noting(*args, **kwargs):
        seen.append(kwargs["fold_window"])
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(pipeline, "open_round", open_noting)
    await one_stored_round(settings.model_copy(update={"fold_window": window}), runtime, outcomes)
    assert seen == [window]


@pytest.mark.parametrize("pool_mib", [0, 64])
async def test_a_stored_round_gives_its_model_buffers_to_the_pool(
    settings, runtime, outcomes, monkeypatch, pool_mib
):
    """The handler gives the model's buffers back only after the round is stored; the stored model
    is the expected one either way, and FEDHUB_AGGREGATOR_BUFFER_POOL_MIB 0 keeps nothing."""
    pools: list[engine.BufferPool] = []
    real_pool = engine.BufferPool

    def noting_pool(max_bytes: int) -> engine.BufferPool:
        pools.append(real_pool(max_bytes))
        return pools[-1]

    monkeypatch.setattr(engine, "BufferPool", noting_pool)
    result = await one_stored_round(
        settings.model_copy(update={"buffer_pool_mib": pool_mib}), runtime, outcomes
    )
    assert [p.max_bytes for p in pools] == [pool_mib * 1024 * 1024]
    # The model's floating tensors were lent by the round's lease; integer ones are not pooled.
    floating = sum(t.numel() * t.element_size() for t in result.values() if t.dtype.is_floating_point)
    assert pools[0].held_bytes == (floating if pool_mib else 0)
