"""Distributed mode end to end: api, notifier, orchestrator and two aggregators as OS processes over
the machine's real RabbitMQ and PostgreSQL, clients over real HTTP; then the same run with faults.

Each fault is inflicted from outside (kill -9, rabbitmqctl, PostgreSQL locks; `tests/e2e/faults.py`)
at a moment that is proven, not hoped for: a lock the test holds makes one kind of write wait, so the
work doing it is in flight until the test lets it go, and the broker shows who holds which message.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import torch

from fedhub.client import ActorClient, Client
from fedhub.client.types import FitFn
from fedhub.distributed import ClusterSettings, LocalCluster
from fedhub.task import DemoWorkload, make_model
from shared.metrics import parse_exposition, total
from tests import postgres
from tests.e2e.faults import (
    Broker,
    committed,
    model_gate,
    reconnects,
    transition_gate,
    until,
    upload_gate,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(300)]

CLIENTS, ROUNDS = 5, 3
LAST = CLIENTS - 1
"""The client whose `fit` a fault may hold back, to place itself between two uploads of a round."""
SERVICES = ["aggregator-1", "aggregator-2", "api", "notifier", "orchestrator"]
AGGREGATORS = ("aggregator-1", "aggregator-2")


@dataclass
class Outcome:
    """What a run produced."""

    state: str
    final_model: dict[str, torch.Tensor]
    rounds: list[dict[str, Any]]
    accuracy: tuple[float, float]
    uploads: list[tuple[int, int]]
    """(round, client) of every upload the clients saw accepted."""
    streams: dict[str, float]
    """Event streams the notifier opened, by what served them (`socket`, `asgi`)."""
    gated: float
    """Requests that took a slot at the API's socket gate (since its last start)."""


class Faults:
    """What a run inflicts besides the training. The base class inflicts nothing; it counts uploads and
    can hold the last client's `fit` in chosen rounds.

    Subclasses run their faults as tasks (`spawn`) from `before_start`; the run awaits them after the
    clients finish, so a fault's failure fails the test (its `finally` must release what it holds).
    """

    def __init__(self, settings: ClusterSettings, broker: Broker | None = None) -> None:
        self.settings = settings
        self._broker = broker
        self.tasks: list[asyncio.Task[None]] = []
        self.uploads: dict[int, int] = {}
        self._upload = asyncio.Event()
        self._held: dict[int, threading.Event] = {}

    @property
    def broker(self) -> Broker:
        """rabbitmqctl on the cluster's broker."""
        assert self._broker is not None
        return self._broker

    def queue(self, consumer: str) -> str:
        """The broker's name of `consumer`'s queue in this cluster's namespace."""
        return f"{self.settings.bus_namespace}.{consumer}"

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` beside the training."""
        self.tasks.append(asyncio.create_task(coro))

    async def before_start(self, cluster: LocalCluster) -> None:
        """Called once the training exists, before it starts."""

    def on_event(self, kind: str, details: dict[str, Any]) -> None:
        """Called on every client event (`uploaded`, `tested`, `finished`)."""
        if kind == "uploaded":
            self.uploads[details["round"]] = self.uploads.get(details["round"], 0) + 1
            seen, self._upload = self._upload, asyncio.Event()
            seen.set()

    async def uploaded(self, round_number: int, count: int) -> None:
        """Wait until the clients saw `count` uploads of `round_number` accepted."""
        while self.uploads.get(round_number, 0) < count:
            await self._upload.wait()

    def hold(self, round_number: int) -> threading.Event:
        """Hold the last client's `fit` of `round_number` until the returned event is set."""
        self._held[round_number] = threading.Event()
        return self._held[round_number]

    def fit(self, client: int, fit: FitFn) -> FitFn:
        """`fit` for `client`, held back in the rounds `hold` named."""
        if client != LAST:
            return fit

        def held(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
            release = self._held.get(int(config["round"]))
            if release is not None and not release.wait(timeout=120):
                raise TimeoutError(f"fit of round {config['round']} was never released")
            return fit(weights, config)

        return held


@pytest.fixture
async def cluster_settings(tmp_path: Path, rabbitmq_url: str) -> AsyncIterator[ClusterSettings]:
    """A fresh migrated-on-start PostgreSQL database and a private RabbitMQ namespace per run."""
    try:
        name = await postgres.create_database()
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        postgres.unavailable(f"{type(exc).__name__}: {exc}")
    settings = ClusterSettings(
        database_url=postgres.async_url(name),
        amqp_url=rabbitmq_url,
        aggregators=2,
        log_dir=tmp_path / "logs",
        bus_namespace=f"fedhub-test-{uuid4().hex[:8]}",
    )
    try:
        yield settings
    finally:
        await postgres.drop_database(name)


async def _train(settings: ClusterSettings, faults: Faults | None = None) -> Outcome:
    faults = faults or Faults(settings)
    workload = DemoWorkload.create(CLIENTS, seed=2)
    uploads: list[tuple[int, int]] = []
    try:
        async with LocalCluster(settings) as cluster:
            actor = ActorClient(cluster.base_url, cluster.admin_token, events_url=cluster.events_url)
            principals = [await actor.create_principal(f"site-{i}") for i in range(CLIENTS)]
            model = await actor.upload_model(make_model(2).state_dict())
            training = await actor.create_training(model.id, [p.id for p in principals], rounds=ROUNDS)
            training_id = UUID(str(training["id"]))

            def hook(client: int) -> Any:
                def on_event(kind: str, details: dict[str, Any]) -> None:
                    if kind == "uploaded":
                        uploads.append((details["round"], client))
                    faults.on_event(kind, details)

                return on_event

            clients = [
                Client(
                    cluster.base_url,
                    p.token,
                    fit=faults.fit(i, workload.fit_fn(i, epochs=2, lr=0.2)),
                    evaluate=workload.evaluate_fn(i),
                    training_id=training_id,
                    events_url=cluster.events_url,
                    on_event=hook(i),
                )
                for i, p in enumerate(principals)
            ]
            await faults.before_start(cluster)
            runs = [asyncio.create_task(c.run()) for c in clients]
            await actor.start_training(training_id)
            try:
                await asyncio.wait_for(asyncio.gather(*runs), timeout=150)
            finally:
                # A failed fault released what it held, so the clients finished: its error surfaces here.
                await asyncio.gather(*faults.tasks)
            final = await actor.get_training(training_id)
            rounds = await actor.get_rounds(training_id)
            weights = await actor.download_model(UUID(str(final["current_model_id"])))
            await actor.aclose()
            async with httpx.AsyncClient(base_url=cluster.events_url) as http:
                samples = parse_exposition((await http.get("/metrics")).text)
            streams = {
                kind: total(samples, "fedhub_event_streams_opened_total", served_by=kind)
                for kind in ("socket", "asgi")
            }
            async with httpx.AsyncClient(base_url=cluster.base_url) as http:
                api_samples = parse_exposition((await http.get("/metrics")).text)
            gated = total(api_samples, "fedhub_api_socket_gate_requests_total")
            codes = cluster.stop()
    finally:
        await _delete_namespace(settings)
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown is done: -15 is clean too.
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), f"unclean exit on SIGTERM: {codes}"
    return Outcome(
        str(final["state"]), weights, rounds, workload.global_accuracy(weights), uploads, streams, gated
    )


async def _delete_namespace(settings: ClusterSettings) -> None:
    """Delete the run's queues and exchange from the shared broker."""
    await LocalCluster(settings).delete_bus_namespace()


_FAULT_FREE: list[Outcome] = []


async def _fault_free(settings: ClusterSettings) -> Outcome:
    """The fault-free run's outcome (same seed and workload), run once per session and kept."""
    if not _FAULT_FREE:
        reference = replace(
            settings,
            bus_namespace=f"{settings.bus_namespace}-reference",
            log_dir=settings.log_dir.with_name("reference-logs"),
        )
        _FAULT_FREE.append(await _train(reference))
        await postgres.truncate_all(settings.database_url.rsplit("/", 1)[1])
    return _FAULT_FREE[0]


def _assert_same_training(outcome: Outcome, reference: Outcome) -> None:
    """Completed, every accepted update counted exactly once, the fault-free run's final model to 1e-6."""
    assert outcome.state == "COMPLETED"
    assert [r["num_updates"] for r in outcome.rounds] == [CLIENTS] * ROUNDS
    assert [r["num_examples"] for r in outcome.rounds] == [r["num_examples"] for r in reference.rounds]
    assert sorted(outcome.uploads) == [(r, c) for r in range(1, ROUNDS + 1) for c in range(CLIENTS)], (
        "every client uploaded once per round"
    )
    assert outcome.final_model.keys() == reference.final_model.keys()
    for name, tensor in reference.final_model.items():
        torch.testing.assert_close(outcome.final_model[name], tensor, rtol=0, atol=1e-6)


async def test_five_clients_three_rounds_across_processes(cluster_settings: ClusterSettings) -> None:
    """The distributed run completes every round with every update, and the model learns."""
    outcome = await _train(cluster_settings)
    assert outcome.state == "COMPLETED"
    assert [r["num_updates"] for r in outcome.rounds] == [CLIENTS] * ROUNDS
    assert sorted(outcome.uploads) == [(r, c) for r in range(1, ROUNDS + 1) for c in range(CLIENTS)]
    assert all(r["test_metrics"].get("accuracy") is not None for r in outcome.rounds)
    assert outcome.accuracy[0] > 0.6
    # `fedhub notifier` serves every client's stream off the socket (services/notifier/direct.py).
    assert outcome.streams["socket"] >= CLIENTS
    assert outcome.streams["asgi"] == 0
    # `fedhub api` gates the clients' requests at the socket (services/api/connections.py): every
    # upload and test report at least took a slot there.
    assert outcome.gated >= 2 * CLIENTS * ROUNDS
    if not _FAULT_FREE:
        _FAULT_FREE.append(outcome)


class Kills(Faults):
    """kill -9, each at a proven moment, each process started again:

    - round 1: the aggregator holding the round's job, its handler blocked at the model's INSERT;
    - round 2: the api, after four uploads committed, with the fifth accepted and not yet committed;
    - round 3: the orchestrator, with the last upload's event delivered to it and not acknowledged.
    """

    def __init__(self, settings: ClusterSettings, broker: Broker) -> None:
        super().__init__(settings, broker)
        self.seen: dict[str, Any] = {}
        """What each kill found at the moment it struck."""
        self.killed: list[str] = []

    async def before_start(self, cluster: LocalCluster) -> None:
        """Shut the model gate before round 1 can end; hold the last client in rounds 2 and 3."""
        models = model_gate(self.settings.database_url)
        await models.shut()
        self.spawn(self._aggregator(cluster, models))
        self.spawn(self._api(cluster, self.hold(2)))
        self.spawn(self._orchestrator(cluster, self.hold(3)))

    def _kill(self, cluster: LocalCluster, name: str) -> None:
        cluster.services[name].kill()
        self.killed.append(name)

    async def _aggregator(self, cluster: LocalCluster, models: Any) -> None:
        try:
            held = await until(
                lambda: self.broker.holders(cluster, self.queue("aggregator")),
                "an aggregator to take round 1's job",
            )
            ((holder, unacked),) = held.items()
            self.seen["aggregator"] = {
                "holder": holder,
                "unacked": unacked,
                "handlers_at_insert": await until(models.waiting, "its handler to reach the model's INSERT"),
                "models": await committed(self.settings.database_url, "model", 1),
            }
            self._kill(cluster, holder)

            async def taken_over() -> dict[str, int]:
                held = await self.broker.holders(cluster, self.queue("aggregator"))
                return {service: n for service, n in held.items() if service != holder}

            self.seen["aggregator"]["then_held_by"] = await until(
                taken_over, "the other aggregator to get the job redelivered"
            )
        finally:
            await models.open()

        async def round_model() -> int:
            return await committed(self.settings.database_url, "model", 1)

        # Started again only once the model is committed: the other replica alone can have done it.
        self.seen["aggregator"]["models_before_restart"] = await until(round_model, "round 1's model")
        await cluster.restart(holder)

    async def _api(self, cluster: LocalCluster, release: threading.Event) -> None:
        uploads = upload_gate(self.settings.database_url)
        try:
            await self.uploaded(2, CLIENTS - 1)
            await uploads.shut()
            release.set()
            self.seen["api"] = {
                "waiting_uploads": await until(uploads.waiting, "the last upload of round 2"),
                "committed_uploads": await committed(self.settings.database_url, "client_update", 2),
            }
            self._kill(cluster, "api")
        finally:
            release.set()
            await uploads.open()
        await asyncio.sleep(0.3)
        await cluster.restart("api")

    async def _orchestrator(self, cluster: LocalCluster, release: threading.Event) -> None:
        transitions = transition_gate(self.settings.database_url)
        try:
            await self.uploaded(3, CLIENTS - 1)
            await transitions.shut()
            release.set()
            await self.uploaded(3, CLIENTS)
            held = await until(
                lambda: self.broker.holders(cluster, self.queue("orchestrator")),
                "the orchestrator to take an event of round 3",
            )
            self.seen["orchestrator"] = {
                "held": held,
                "handlers_at_lock": await until(transitions.waiting, "its handler to lock the training"),
            }
            self._kill(cluster, "orchestrator")
        finally:
            release.set()
            await transitions.open()
        await asyncio.sleep(0.3)
        await cluster.restart("orchestrator")


async def test_kills_lose_nothing(cluster_settings: ClusterSettings) -> None:
    """kill -9 of an aggregator holding a job, of the api between two uploads and of the orchestrator
    holding an event: the training completes, no update is lost or counted twice, and the final model
    equals the fault-free run's."""
    faults = Kills(cluster_settings, await Broker.reach(cluster_settings.amqp_url))
    reference = await _fault_free(cluster_settings)
    outcome = await _train(cluster_settings, faults)
    _assert_same_training(outcome, reference)

    aggregator, api, orchestrator = faults.seen["aggregator"], faults.seen["api"], faults.seen["orchestrator"]
    # The job was in flight when its aggregator died: delivered to it and unacknowledged, its handler
    # inside the job's transaction, no model of the round committed.
    assert aggregator["holder"] in AGGREGATORS
    assert aggregator["unacked"] == 1
    assert aggregator["handlers_at_insert"] == 1
    assert aggregator["models"] == 0
    # Then the other replica got it, and committed the model while the killed one was still down.
    survivor = next(name for name in AGGREGATORS if name != aggregator["holder"])
    assert aggregator["then_held_by"] == {survivor: 1}
    assert aggregator["models_before_restart"] == 1
    # The api died between the fourth and the fifth upload, the fifth inside its transaction.
    assert api == {"waiting_uploads": 1, "committed_uploads": CLIENTS - 1}
    # The orchestrator died holding an unacknowledged event, its handler at the training's lock.
    assert orchestrator == {"held": {"orchestrator": 1}, "handlers_at_lock": 1}
    assert sorted(faults.killed) == sorted(["api", "orchestrator", aggregator["holder"]])


class Drops(Faults):
    """The broker closes every connection of the cluster twice in round 1: while an upload the api
    accepted waits uncommitted, and while an aggregator holds the round's job."""

    def __init__(self, settings: ClusterSettings, broker: Broker) -> None:
        super().__init__(settings, broker)
        self.seen: list[dict[str, Any]] = []
        """What each drop found at the moment it struck."""
        self.handlers_of_the_job = 0

    async def before_start(self, cluster: LocalCluster) -> None:
        """Shut the upload and the model gates: nothing of round 1 commits until the fault says so."""
        models, uploads = model_gate(self.settings.database_url), upload_gate(self.settings.database_url)
        await models.shut()
        await uploads.shut()
        self.spawn(self._drops(cluster, models, uploads))

    async def _drop(self, cluster: LocalCluster, **seen: Any) -> None:
        url = self.settings.database_url
        seen["uploads"] = await committed(url, "client_update", 1)
        seen["models"] = await committed(url, "model", 1)
        seen["dropped"] = await self.broker.drop(cluster)
        self.seen.append(seen)

    async def _drops(self, cluster: LocalCluster, models: Any, uploads: Any) -> None:
        try:
            await self._drop(cluster, waiting_uploads=await until(uploads.waiting, "an upload of round 1"))
            # The uploads commit while the connections are down: their events wait in the outbox.
            await uploads.open()

            async def all_connected() -> bool:
                return await self.broker.connected(cluster) == set(SERVICES)

            await until(all_connected, "every service to reconnect after the first drop")
            held = await until(
                lambda: self.broker.holders(cluster, self.queue("aggregator")),
                "an aggregator to take round 1's job",
            )
            await until(models.waiting, "the job's handler to reach the model's INSERT")
            await self._drop(cluster, held=held)
            # The unacked job is delivered again while its first handler still waits (its database
            # connection is fine): two handlers of one job, both about to insert the round's model.
            self.handlers_of_the_job = await until(
                lambda: _at_least(2, models.waiting), "the redelivered job to reach its INSERT too"
            )
        finally:
            await uploads.open()
            await models.open()


async def _at_least(n: int, count: Any) -> int:
    value = int(await count())
    return value if value >= n else 0


async def test_dropped_connections_mid_round_lose_nothing(cluster_settings: ClusterSettings) -> None:
    """The broker drops every connection of the cluster mid-round, once with an upload in flight and once
    with a job in flight: every service reconnects by itself, the job runs twice but commits once,
    and the final model equals the fault-free run's."""
    faults = Drops(cluster_settings, await Broker.reach(cluster_settings.amqp_url))
    reference = await _fault_free(cluster_settings)
    outcome = await _train(cluster_settings, faults)
    _assert_same_training(outcome, reference)

    first, second = faults.seen
    assert first["dropped"] == second["dropped"] == SERVICES, "each drop closed every service's connection"
    assert first["waiting_uploads"] >= 1 and first["uploads"] == 0, "an upload was in flight, none committed"
    assert list(second["held"].values()) == [1] and set(second["held"]) <= set(AGGREGATORS)
    assert first["models"] == second["models"] == 0, "both drops came before round 1 had its model"
    # The first handler and the redelivery at least; a third when the job's publish was itself repeated
    # (its confirm lost in the first drop: at-least-once), which the model's key absorbs the same way.
    assert faults.handlers_of_the_job >= 2
    # The same processes went on: each reconnected once per drop, none was restarted.
    assert reconnects(cluster_settings.log_dir) == dict.fromkeys(SERVICES, 2)


class BrokerRestart(Faults):
    """RabbitMQ itself stops while an upload of round 1 waits uncommitted; the uploads commit while it is
    down; it starts again, and the round's job has to go through it."""

    def __init__(self, settings: ClusterSettings, broker: Broker) -> None:
        super().__init__(settings, broker)
        self.seen: dict[str, Any] = {}

    async def before_start(self, cluster: LocalCluster) -> None:
        """Shut the upload and the model gates: nothing of round 1 commits until the fault says so."""
        models, uploads = model_gate(self.settings.database_url), upload_gate(self.settings.database_url)
        await models.shut()
        await uploads.shut()
        self.spawn(self._restart(cluster, models, uploads))

    async def _restart(self, cluster: LocalCluster, models: Any, uploads: Any) -> None:
        url = self.settings.database_url
        try:
            self.seen["waiting_uploads"] = await until(uploads.waiting, "an upload of round 1")
            self.seen["uploads"] = await committed(url, "client_update", 1)
            self.seen["models"] = await committed(url, "model", 1)
            await self.broker.restart(while_down=uploads.open)

            async def all_connected() -> bool:
                return await self.broker.connected(cluster) == set(SERVICES)

            await until(all_connected, "every service to reconnect after the restart")
            self.seen["held"] = await until(
                lambda: self.broker.holders(cluster, self.queue("aggregator")),
                "round 1's job to reach an aggregator",
            )
        finally:
            await uploads.open()
            await models.open()


async def test_broker_restart_mid_round_loses_nothing(cluster_settings: ClusterSettings) -> None:
    """RabbitMQ restarts mid-round: every process reconnects by itself and goes on, the training
    completes with nothing lost or doubled, and the final model equals the fault-free run's."""
    faults = BrokerRestart(cluster_settings, await Broker.reach(cluster_settings.amqp_url))
    reference = await _fault_free(cluster_settings)
    outcome = await _train(cluster_settings, faults)
    _assert_same_training(outcome, reference)

    seen = faults.seen
    assert seen["waiting_uploads"] >= 1 and seen["uploads"] == 0, "an upload was in flight, none committed"
    assert seen["models"] == 0
    assert list(seen["held"].values()) == [1], "the round's job went through the restarted broker"
    assert reconnects(cluster_settings.log_dir) == dict.fromkeys(SERVICES, 1)
