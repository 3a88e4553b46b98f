"""Rounds split across aggregator jobs: the plan (pure), and split results equal to one job's in
embedded mode, with rejections, excluded tensors, server state and seeded noise; parts done twice."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import torch
from sqlalchemy import func, select

from services.aggregator.handlers import part_message_id, round_model_id
from services.aggregator.methods import METHODS, RoundContext
from services.aggregator.models import AggregationPart, AggregationPlan
from services.aggregator.service import Aggregator
from services.aggregator.settings import AggregatorSettings
from services.aggregator.split import plan_split, shard_names
from shared.aggregation import AggregationMethod, AggregationSpec, method_params
from shared.blobs import content_key, update_key
from shared.bus import Envelope, envelope_for
from shared.codec import decode_message, decode_tensors, encode_tensors
from shared.db.models import ClientUpdate, Model, Principal, Training
from shared.enums import Role, RoundPhase, TrainingState
from shared.events import (
    MESSAGE_TYPES,
    AggregatePart,
    AggregateRound,
    AggregationFailed,
    CombineParts,
    ModelAggregated,
    UpdateRef,
)
from shared.runtime import Runtime
from shared.tensors import records_to_state_dict, state_dict_to_records

State = dict[str, torch.Tensor]
DEADLINE_S = 30.0
CLIENTS = 7
TRAINING, OWNER, BASE = UUID(int=1), UUID(int=2), UUID(int=3)


def encode(state: State) -> bytes:
    """The canonical blob of a state dict."""
    return encode_tensors(state_dict_to_records(state))


def model_state(gen: torch.Generator) -> State:
    """A small model with every kind of tensor."""
    return {
        "fc.weight": torch.randn(6, 5, generator=gen),
        "fc.bias": torch.randn(6, generator=gen),
        "bn.running_mean": torch.randn(6, generator=gen, dtype=torch.float64),
        "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen, dtype=torch.int64),
        "half": torch.randn(8, generator=gen).to(torch.bfloat16),
        "mask": torch.randint(0, 2, (5,), generator=gen).to(torch.bool),
    }


# --- the plan ---------------------------------------------------------------------------------


def _job(n: int, method: str = "fedavg", **fields: Any) -> AggregateRound:
    refs = tuple(
        UpdateRef(
            update_id=UUID(int=100 + i),
            client_id=UUID(int=200 + i),
            blob_key=f"update/{i}",
            num_examples=i + 1,
        )
        for i in range(n)
    )
    return AggregateRound(
        job_id=UUID(int=9),
        training_id=TRAINING,
        round=1,
        method=method,
        base_model_id=BASE,
        base_blob_key="sha256/x",
        updates=refs,
        **fields,
    )


SHAPES = {"a": [100], "b": [10, 10], "c": [5], "d": [200], "e": [1]}


def test_linear_rounds_split_into_batches_in_order():
    """Seven updates, batches of three: parts of 3, 3 and 1 updates, in the job's order."""
    job = _job(7)
    split = plan_split(job, METHODS[AggregationMethod.FEDAVG], AggregationSpec(), SHAPES, batch_size=3)
    assert split is not None and split.kind == "batches"
    assert [len(p.round_job.updates) for p in split.parts] == [3, 3, 1]
    assert [u for p in split.parts for u in p.round_job.updates] == list(job.updates)
    assert all((p.parts, p.tensors) == (3, ()) for p in split.parts)
    assert [p.part for p in split.parts] == [0, 1, 2]


def test_small_rounds_global_methods_and_unset_batches_stay_one_job():
    """At most batch_size updates, a global method, or no batch size: no split."""
    fedavg, krum = METHODS[AggregationMethod.FEDAVG], METHODS[AggregationMethod.KRUM]
    spec = AggregationSpec()
    assert plan_split(_job(3), fedavg, spec, SHAPES, batch_size=3) is None
    assert plan_split(_job(9), fedavg, spec, SHAPES, batch_size=None) is None
    assert plan_split(_job(9, "krum"), krum, AggregationSpec(method="krum"), SHAPES, batch_size=2) is None
    median = METHODS[AggregationMethod.MEDIAN]
    assert plan_split(_job(9, "median"), median, AggregationSpec(method="median"), None, batch_size=2) is None


def test_coordinate_wise_rounds_split_into_shards_of_the_kept_tensors():
    """Median: shards over every update, covering the non-excluded tensors in order, about equal."""
    job = _job(6, "median")
    spec = AggregationSpec(method="median", exclude_vars="^e$")
    split = plan_split(job, METHODS[AggregationMethod.MEDIAN], spec, SHAPES, batch_size=2)
    assert split is not None and split.kind == "shards"
    assert len(split.parts) == 3
    assert [n for p in split.parts for n in p.tensors] == ["a", "b", "c", "d"]
    assert all(p.round_job == job for p in split.parts)
    pinned = plan_split(job, METHODS[AggregationMethod.MEDIAN], spec, SHAPES, batch_size=2, shards=2)
    assert pinned is not None and [p.tensors for p in pinned.parts] == [("a", "b", "c"), ("d",)]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shard_names_are_contiguous_non_empty_and_cover_everything(count):
    """Every cut keeps the order, leaves no shard empty and uses each name once."""
    sizes = {"a": 100, "b": 100, "c": 5, "d": 200, "e": 1}
    groups = shard_names(sizes, count)
    assert len(groups) == count
    assert all(groups) and [n for g in groups for n in g] == list(sizes)
    with pytest.raises(ValueError, match="cannot cut"):
        shard_names(sizes, 6)


# --- split rounds end to end (embedded) -------------------------------------------------------


@dataclass
class Seeded:
    """A round's stored inputs."""

    job: AggregateRound
    updates: list[State]


async def seed(runtime: Runtime, method: str, params: dict[str, Any], **job_fields: Any) -> Seeded:
    """The same principals, model, training and updates (ids included) in any runtime."""
    gen = torch.Generator().manual_seed(11)
    base = model_state(gen)
    data = encode(base)
    key, digest = content_key(data)
    await runtime.blobs.put(key, data)
    clients = [UUID(int=200 + i) for i in range(CLIENTS)]
    principals = [Principal(id=OWNER, name="owner", role=Role.ACTOR, token_hash="owner")] + [
        Principal(id=c, name=f"c{i}", role=Role.CLIENT, token_hash=f"t{i}") for i, c in enumerate(clients)
    ]
    spec = {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in base.items()}
    model = Model(
        id=BASE, name="initial", owner_id=OWNER, blob_key=key, digest=digest, size_bytes=len(data), spec=spec
    )
    training = Training(
        id=TRAINING,
        owner_id=OWNER,
        initial_model_id=BASE,
        current_model_id=BASE,
        aggregation=method,
        rounds=1,
        min_clients=1,
        round_timeout_s=60.0,
        state=TrainingState.ONGOING,
        phase=RoundPhase.AGGREGATING,
        round=1,
    )
    rows, refs, updates = [], [], []
    excluded = job_fields.get("exclude_vars")
    for i, client in enumerate(clients):
        update = model_state(gen)
        if excluded is not None:
            update = {
                k: v for k, v in update.items() if not AggregationSpec(exclude_vars=excluded).excluded(k)
            }
        if i == 3:
            update["fc.bias"] = torch.full((6,), float("nan"))  # rejected in whichever part holds it
        update_id = UUID(int=100 + i)
        blob = encode(update)
        await runtime.blobs.put(update_key(update_id), blob)
        rows.append(
            ClientUpdate(
                id=update_id,
                training_id=TRAINING,
                round=1,
                client_id=client,
                blob_key=update_key(update_id),
                digest=content_key(blob)[1],
                num_examples=3 + 5 * i,
            )
        )
        refs.append(
            UpdateRef(
                update_id=update_id, client_id=client, blob_key=update_key(update_id), num_examples=3 + 5 * i
            )
        )
        updates.append(update)
    async with runtime.uow() as uow:
        for batch in (principals, [model], [training], rows):
            uow.session.add_all(batch)
            await uow.session.flush()
    job = AggregateRound(
        job_id=UUID(int=9),
        training_id=TRAINING,
        round=1,
        method=method,
        params=params,
        base_model_id=BASE,
        base_blob_key=key,
        updates=tuple(refs),
        delete_updates_after=False,
        **job_fields,
    )
    return Seeded(job, updates)


class Announcements:
    """Every ModelAggregated / AggregationFailed / CombineParts the bus carried."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def collect(self, envelope: Envelope) -> None:
        """Keep one."""
        self.messages.append(decode_message(MESSAGE_TYPES[envelope.type], envelope.body))

    def of(self, cls: type) -> list[Any]:
        """Those of one type."""
        return [m for m in self.messages if isinstance(m, cls)]


async def wait_for_outcome(seen: Announcements) -> None:
    """Until the round is announced, one way or the other."""
    deadline = time.monotonic() + DEADLINE_S
    while not seen.of(ModelAggregated) and not seen.of(AggregationFailed):
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the round's outcome")
        await asyncio.sleep(0.01)


@dataclass
class Result:
    """What a round produced."""

    model: State
    announced: ModelAggregated
    parts: int
    reasons: dict[UUID, str | None]


async def run_round(
    path: Path,
    *,
    batch_size: int | None,
    method: str,
    params: dict[str, Any],
    state: State | None = None,
    **job_fields: Any,
) -> Result:
    """Seed the round in a fresh runtime under `path`, run it through the aggregator service, read back."""
    settings = AggregatorSettings(
        database_url=f"sqlite+aiosqlite:///{path / 'fedhub.db'}",
        blob_path=path / "blobs",
        device="cpu",
        batch_size=batch_size,
    )
    runtime = await Runtime.open(settings, create_tables=True)
    service = Aggregator(settings, runtime)
    try:
        seeded = await seed(runtime, method, params, **job_fields)
        job = seeded.job
        if state is not None:
            data = encode(state)
            key, _ = content_key(data)
            await runtime.blobs.put(key, data)
            job = replace(job, base_state_blob_key=key)
        seen = Announcements()
        await runtime.bus.subscribe(
            "test-announcements",
            [ModelAggregated.routing_key, AggregationFailed.routing_key, CombineParts.routing_key],
            seen.collect,
        )
        await service.start()
        await runtime.bus.publish([envelope_for(job)])
        await wait_for_outcome(seen)
        assert seen.of(AggregationFailed) == [], seen.of(AggregationFailed)
        (announced,) = seen.of(ModelAggregated)
        async with runtime.uow() as uow:
            model = await uow.session.get(Model, round_model_id(TRAINING, 1))
            assert model is not None
            parts = await uow.session.scalar(select(func.count()).select_from(AggregationPart)) or 0
            reasons = dict(
                (await uow.session.execute(select(ClientUpdate.id, ClientUpdate.rejected_reason))).all()
            )
        tensors = records_to_state_dict(decode_tensors(await runtime.blobs.get(model.blob_key)))
        assert len(seen.of(CombineParts)) == (1 if parts else 0)
        return Result(tensors, announced, parts, reasons)
    finally:
        await service.stop()
        await runtime.close()


def fedadam_state() -> State:
    """Server moments as a previous FedAdam round leaves them."""
    gen = torch.Generator().manual_seed(5)
    base = model_state(gen)
    ctx = RoundContext(base=base, device=torch.device("cpu"))
    method = METHODS[AggregationMethod.FEDADAM](ctx, method_params("fedadam"))
    method.add(model_state(gen), 1.0)
    return method.result().state


CASES = {
    "fedavg": ("fedavg", {}, None, {}),
    "fedprox-excluded": ("fedprox", {"mu": 0.1}, None, {"exclude_vars": r"^bn\.num"}),
    "fedadam-with-state": ("fedadam", {"server_lr": 0.3}, "state", {}),
    "dp-fedavg-noise": ("dp_fedavg", {"clip_norm": 2.0, "noise_multiplier": 0.5}, None, {}),
    "median": ("median", {}, None, {}),
    "trimmed-mean-excluded": ("trimmed_mean", {"beta": 0.2}, None, {"exclude_vars": "^half$"}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_split_round_equals_the_single_job(tmp_path, case):
    """Batches (linear) or shards (coordinate-wise) over several jobs: the model equals one job's to
    1e-6, the same update is rejected with the same reason, and the announcement counts match."""
    method, params, state_kind, fields = CASES[case]
    state = fedadam_state() if state_kind == "state" else None
    single = await run_round(
        tmp_path / "single", batch_size=None, method=method, params=params, state=state, **fields
    )
    split = await run_round(
        tmp_path / "split", batch_size=2, method=method, params=params, state=state, **fields
    )
    assert single.parts == 0
    assert split.parts == 4  # 7 updates: 4 batches of 2, or 4 shards of the tensors aggregated
    assert list(split.model) == list(single.model)
    for name, tensor in single.model.items():
        assert split.model[name].dtype == tensor.dtype
        torch.testing.assert_close(split.model[name], tensor, rtol=0, atol=1e-6, msg=name)
    bad = UUID(int=103)
    assert (split.announced.num_updates, split.announced.rejected) == (CLIENTS - 1, (bad,))
    assert (single.announced.num_updates, single.announced.num_examples) == (
        split.announced.num_updates,
        split.announced.num_examples,
    )
    assert split.reasons == single.reasons
    assert "NaN or Inf" in (split.reasons[bad] or "")


async def test_a_part_done_twice_has_one_effect(tmp_path):
    """Every part delivered again under new message ids: one row each, one combine, one model."""
    settings = AggregatorSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        device="cpu",
        batch_size=3,
    )
    runtime = await Runtime.open(settings, create_tables=True)
    service = Aggregator(settings, runtime)
    try:
        seeded = await seed(runtime, "fedavg", {})
        seen = Announcements()
        await runtime.bus.subscribe(
            "test-announcements",
            [
                ModelAggregated.routing_key,
                AggregationFailed.routing_key,
                CombineParts.routing_key,
                AggregatePart.routing_key,
            ],
            seen.collect,
        )
        await service.start()
        await runtime.bus.publish([envelope_for(seeded.job)])
        await wait_for_outcome(seen)
        parts = seen.of(AggregatePart)
        assert [p.part for p in parts] == [0, 1, 2]
        assert len(seen.of(CombineParts)) == 1
        # Redelivered after the fact (a worker that died after its commit), and the job itself again.
        await runtime.bus.publish([envelope_for(p) for p in parts] + [envelope_for(seeded.job)])
        await runtime.bus.publish([envelope_for(seen.of(CombineParts)[0])])
        sentinel = replace(seeded.job, job_id=UUID(int=77), training_id=UUID(int=78), method="no-such")
        await runtime.bus.publish([envelope_for(sentinel)])
        deadline = time.monotonic() + DEADLINE_S
        while not any(f.job_id == sentinel.job_id for f in seen.of(AggregationFailed)):
            assert time.monotonic() < deadline, "the sentinel job never failed"
            await asyncio.sleep(0.01)
        assert len(seen.of(ModelAggregated)) == 1
        assert len(seen.of(CombineParts)) == 2  # the one emitted, and the one this test sent again
        assert len(seen.of(AggregatePart)) == 6  # no part was emitted a second time
        async with runtime.uow() as uow:
            assert await uow.session.scalar(select(func.count()).select_from(AggregationPart)) == 3
            plan = await uow.session.get(AggregationPlan, (TRAINING, 1))
            assert plan is not None and (plan.parts_done, plan.parts_total, plan.kind) == (3, 3, "batches")
            assert await uow.session.scalar(select(func.count()).select_from(Model)) == 2  # base + round 1
        # Part blobs are deleted once the round is recorded.
        for i in range(3):
            assert not await runtime.blobs.exists(f"part/{TRAINING}.1.{i}")
        assert (
            part_message_id(TRAINING, 1, 0)
            != part_message_id(TRAINING, 1, 1)
            != part_message_id(TRAINING, 1, None)
        )
    finally:
        await service.stop()
        await runtime.close()


@pytest.mark.parametrize("method", ["fedavg", "median"])
async def test_a_failed_part_fails_the_round_with_its_reason(tmp_path, method):
    """Without the base model no part can run: the combine job fails the round naming the cause."""
    settings = AggregatorSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        device="cpu",
        batch_size=3,
    )
    runtime = await Runtime.open(settings, create_tables=True)
    service = Aggregator(settings, runtime)
    try:
        seeded = await seed(runtime, method, {})
        await runtime.blobs.delete(seeded.job.base_blob_key)
        seen = Announcements()
        await runtime.bus.subscribe(
            "test-announcements",
            [ModelAggregated.routing_key, AggregationFailed.routing_key, CombineParts.routing_key],
            seen.collect,
        )
        await service.start()
        await runtime.bus.publish([envelope_for(seeded.job)])
        await wait_for_outcome(seen)
        (failure,) = seen.of(AggregationFailed)
        assert failure.reason.startswith("part 0: base model")
        assert "does not exist" in failure.reason
        assert seen.of(ModelAggregated) == []
        assert len(seen.of(CombineParts)) == 1
    finally:
        await service.stop()
        await runtime.close()
