"""Aggregation across pods: the same rounds with one aggregator doing whole rounds, and with three
aggregator processes sharing batches and shards over RabbitMQ and PostgreSQL, give the same models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import torch
from sqlalchemy import func, select

from fedhub.client import ActorClient, Client
from fedhub.distributed import ClusterSettings, LocalCluster
from fedhub.task import DemoWorkload
from services.aggregator.models import AggregationPart
from shared.db import create_engine
from tests import postgres

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(400)]

CLIENTS, BATCH = 6, 2
METHODS = ("fedavg", "median")
"""A linear method (split into batches of updates) and a coordinate-wise one (split into shards)."""


@dataclass
class Run:
    """The round-1 model of each training, by method, and how many parts each round was split into."""

    models: dict[str, dict[str, torch.Tensor]]
    parts: dict[str, int]
    part_logs: int


@pytest.fixture
async def databases() -> AsyncIterator[list[str]]:
    """Two fresh PostgreSQL databases (one per cluster run)."""
    names: list[str] = []
    try:
        for _ in range(2):
            names.append(await postgres.create_database())
    except (OSError, TimeoutError, postgres.asyncpg.PostgresError) as exc:
        postgres.unavailable(f"{type(exc).__name__}: {exc}")
    try:
        yield names
    finally:
        for name in names:
            await postgres.drop_database(name)


async def _run(database: str, log_dir: Path, aggregators: int, batch_size: int | None) -> Run:
    settings = ClusterSettings(
        database_url=postgres.async_url(database),
        aggregators=aggregators,
        log_dir=log_dir,
        bus_namespace=f"fedhub-split-{uuid4().hex[:8]}",
        delete_bus_namespace=True,
        extra_env={"FEDHUB_AGGREGATOR_BATCH_SIZE": str(batch_size)} if batch_size is not None else {},
    )
    workload = DemoWorkload.create(CLIENTS, seed=3)
    models: dict[str, dict[str, torch.Tensor]] = {}
    training_ids: dict[str, UUID] = {}
    async with LocalCluster(settings) as cluster:
        actor = ActorClient(cluster.base_url, cluster.admin_token, events_url=cluster.events_url)
        initial = workload.initial_weights()
        model = await actor.upload_model(initial)
        runs = []
        for method in METHODS:
            principals = [await actor.create_principal(f"{method}-{i}") for i in range(CLIENTS)]
            training = await actor.create_training(
                model.id, [p.id for p in principals], rounds=1, aggregation=method, skip_model_tests=True
            )
            training_ids[method] = UUID(str(training["id"]))
            runs += [
                Client(
                    cluster.base_url,
                    p.token,
                    fit=workload.fit_fn(i, epochs=1, lr=0.1),
                    training_id=training_ids[method],
                    events_url=cluster.events_url,
                ).run()
                for i, p in enumerate(principals)
            ]
        tasks = [asyncio.create_task(r) for r in runs]
        for training_id in training_ids.values():
            await actor.start_training(training_id)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
        assert all(r.state == "COMPLETED" for r in results), [r.state for r in results]
        for method, training_id in training_ids.items():
            (round1,) = await actor.get_rounds(training_id)
            assert (round1["num_updates"], round1["rejected"]) == (CLIENTS, [])
            models[method] = await actor.download_model(round1["model_id"])
        await actor.aclose()
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            parts = {
                method: int(
                    await conn.scalar(
                        select(func.count())
                        .select_from(AggregationPart)
                        .where(AggregationPart.training_id == training_id)
                    )
                    or 0
                )
                for method, training_id in training_ids.items()
            }
    finally:
        await engine.dispose()
    return Run(models, parts, await asyncio.to_thread(_parts_logged, log_dir))


def _parts_logged(log_dir: Path) -> int:
    """How many `aggregation.part_done` lines the aggregator processes logged (JSON logs)."""
    return sum(
        1
        for path in log_dir.glob("aggregator-*.log")
        for line in path.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "aggregation.part_done"
    )


async def test_three_aggregators_sharing_parts_match_one_aggregator(
    databases: list[str], tmp_path: Path
) -> None:
    """FedAvg in batches of two updates and median in tensor shards, on three aggregator processes:
    each round's model equals the one-process, one-job model to 1e-6."""
    single = await _run(databases[0], tmp_path / "single", aggregators=1, batch_size=None)
    split = await _run(databases[1], tmp_path / "split", aggregators=3, batch_size=BATCH)
    assert single.parts == {"fedavg": 0, "median": 0}
    # Six updates: three batches of two; median over the MLP's four tensors: three shards.
    assert split.parts == {"fedavg": 3, "median": 3}
    assert split.part_logs == 6
    for method in METHODS:
        reference, result = single.models[method], split.models[method]
        assert list(result) == list(reference)
        for name, tensor in reference.items():
            torch.testing.assert_close(result[name], tensor, rtol=0, atol=1e-6, msg=f"{method} {name}")
