"""Distributed mode end to end: api, notifier, orchestrator and two aggregators as OS processes over
the machine's real RabbitMQ and PostgreSQL, clients over real HTTP; then the same run with faults."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import torch

from fedhub.client import ActorClient, Client
from fedhub.distributed import ClusterSettings, LocalCluster
from fedhub.task import DemoWorkload, make_model
from tests import postgres

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]

CLIENTS, ROUNDS = 5, 3
Fault = Callable[[LocalCluster, str, dict[str, Any]], Awaitable[None]]


@dataclass
class Outcome:
    """What a run produced."""

    state: str
    final_model: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]]
    accuracy: tuple[float, float]


@pytest.fixture
async def cluster_settings(tmp_path: Path) -> AsyncIterator[ClusterSettings]:
    """A fresh migrated-on-start PostgreSQL database and a private RabbitMQ namespace per run."""
    try:
        name = await postgres.create_database()
    except (OSError, TimeoutError, postgres.asyncpg.PostgresError) as exc:
        postgres.unavailable(f"{type(exc).__name__}: {exc}")
    settings = ClusterSettings(
        database_url=postgres.async_url(name),
        aggregators=2,
        log_dir=tmp_path / "logs",
        bus_namespace=f"fedhub-test-{uuid4().hex[:8]}",
    )
    try:
        yield settings
    finally:
        await postgres.drop_database(name)


async def _train(settings: ClusterSettings, fault: Fault | None = None) -> Outcome:
    workload = DemoWorkload.create(CLIENTS, seed=2)
    async with LocalCluster(settings) as cluster:
        actor = ActorClient(cluster.base_url, cluster.admin_token, events_url=cluster.events_url)
        principals = [await actor.create_principal(f"site-{i}") for i in range(CLIENTS)]
        initial = make_model(2).state_dict()
        model = await actor.upload_model(initial)
        training = await actor.create_training(model.id, [p.id for p in principals], rounds=ROUNDS)
        training_id = UUID(str(training["id"]))
        pending: list[asyncio.Task[None]] = []

        def hook(kind: str, details: dict[str, Any]) -> None:
            if fault is not None:
                pending.append(asyncio.create_task(fault(cluster, kind, details)))

        clients = [
            Client(
                cluster.base_url,
                p.token,
                fit=workload.fit_fn(i, epochs=2, lr=0.2),
                evaluate=workload.evaluate_fn(i),
                training_id=training_id,
                events_url=cluster.events_url,
                on_event=hook,
            )
            for i, p in enumerate(principals)
        ]
        runs = [asyncio.create_task(c.run()) for c in clients]
        await actor.start_training(training_id)
        await asyncio.wait_for(asyncio.gather(*runs), timeout=200)
        await asyncio.gather(*pending)
        final = await actor.get_training(training_id)
        rounds = await actor.get_rounds(training_id)
        weights = await actor.download_model(UUID(str(final["current_model_id"])))
        await actor.aclose()
        codes = cluster.stop()
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done: -15 is clean too.
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), f"unclean exit on SIGTERM: {codes}"
    return Outcome(str(final["state"]), weights, rounds, workload.global_accuracy(weights))


async def test_five_clients_three_rounds_across_processes(cluster_settings: ClusterSettings) -> None:
    """The distributed run completes every round with every update, and the model learns."""
    outcome = await _train(cluster_settings)
    assert outcome.state == "COMPLETED"
    assert [r["num_updates"] for r in outcome.rounds] == [CLIENTS] * ROUNDS
    assert all(r["test_metrics"].get("accuracy") is not None for r in outcome.rounds)
    assert outcome.accuracy[0] > 0.6


def _kill_once(name: str, when: Callable[[str, dict[str, Any]], bool]) -> Fault:
    """A fault: SIGKILL service `name` the first time `when` holds, then start it again."""
    done = False

    async def fault(cluster: LocalCluster, kind: str, details: dict[str, Any]) -> None:
        nonlocal done
        if done or not when(kind, details):
            return
        done = True
        cluster.services[name].kill()
        await asyncio.sleep(0.3)
        await cluster.restart(name)

    return fault


def _drop_broker_connections() -> None:
    subprocess.run(  # the broker closes every client connection, as in a network blip
        ["rabbitmqctl", "close_all_connections", "fault test"], capture_output=True, check=False, timeout=30
    )


async def test_kills_and_dropped_connections_lose_nothing(cluster_settings: ClusterSettings) -> None:
    """kill -9 of the api between uploads, of the orchestrator, of an aggregator mid-round, and dropped
    broker connections: the training completes, no update is lost or counted twice, and the final
    model equals the fault-free run's."""
    reference = await _train(cluster_settings)
    database = cluster_settings.database_url.rsplit("/", 1)[1]
    await postgres.truncate_all(database)
    cluster_settings.bus_namespace += "-faults"
    uploads = 0
    faults = [
        _kill_once("api", lambda k, d: k == "uploaded" and d.get("round") == 1),
        _kill_once("orchestrator", lambda k, d: k == "uploaded" and d.get("round") == 2),
        _kill_once("aggregator-1", lambda k, d: k == "uploaded" and d.get("round") == 3),
    ]

    async def all_faults(cluster: LocalCluster, kind: str, details: dict[str, Any]) -> None:
        nonlocal uploads
        if kind == "tested" and details.get("round") == 1:
            await asyncio.to_thread(_drop_broker_connections)
        for fault in faults:
            await fault(cluster, kind, details)
        uploads += kind == "uploaded"

    outcome = await _train(cluster_settings, all_faults)
    assert outcome.state == "COMPLETED"
    assert [r["num_updates"] for r in outcome.rounds] == [CLIENTS] * ROUNDS
    assert [r["num_examples"] for r in outcome.rounds] == [r["num_examples"] for r in reference.rounds]
    for name, tensor in reference.final_model.items():
        torch.testing.assert_close(outcome.final_model[name], tensor, rtol=0, atol=1e-6)
    assert uploads == CLIENTS * ROUNDS, "every client uploaded once per round (the SDK saw no duplicates)"
