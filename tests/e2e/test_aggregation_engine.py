"""The aggregation engine in embedded mode, over real HTTP: server state across rounds, delta and
excluded-tensor uploads, rejected updates, ensemble members."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import pytest
import torch
from sqlalchemy import select

from fedhub.client import ActorClient, Client
from fedhub.client.types import FitFn
from fedhub.embedded import EmbeddedServer, EmbeddedSettings
from fedhub.task import DemoWorkload
from services.aggregator.methods import METHODS, RoundContext
from services.aggregator.rounds import round_seed
from shared.aggregation import AggregationMethod, method_params
from shared.codec import decode_tensors
from shared.db.models import ClientUpdate, Model
from shared.tensors import records_to_state_dict

pytestmark = pytest.mark.e2e

State = dict[str, torch.Tensor]


@dataclass
class Run:
    """A finished training: its JSON, its rounds, each round's model and the clients' ids by index."""

    training: dict[str, Any]
    rounds: list[dict[str, Any]]
    models: list[State]
    clients: list[UUID]
    fitted: dict[tuple[int, int], State] = field(default_factory=dict)
    """What each (client index, round) `fit` returned."""


async def train(
    server: EmbeddedServer,
    workload: DemoWorkload,
    *,
    rounds: int,
    initial: State,
    tamper: Callable[[int, State], State] | None = None,
    **options: Any,
) -> Run:
    """Run one training of `workload`'s clients to its end (no test rounds) and collect what it made."""
    actor = ActorClient(server.base_url, server.admin_token)
    try:
        principals = [await actor.create_principal(f"site-{i}") for i in range(workload.num_clients)]
        model = await actor.upload_model(initial, name="mlp")
        training = await actor.create_training(
            model.id, [p.id for p in principals], rounds=rounds, skip_model_tests=True, **options
        )
        training_id = UUID(str(training["id"]))
        run = Run(training, [], [], [p.id for p in principals])

        def fit_of(index: int) -> FitFn:
            fit = workload.fit_fn(index, epochs=1, lr=0.1)

            def recorded(weights: State, config: dict[str, Any]) -> tuple[State, int, dict[str, float]]:
                new, n, metrics = fit(weights, config)
                run.fitted[(index, int(config["round"]))] = {k: v.clone() for k, v in new.items()}
                return (tamper(index, new) if tamper is not None else new), n, metrics

            return recorded

        clients = [
            Client(server.base_url, p.token, fit=fit_of(i), training_id=training_id)
            for i, p in enumerate(principals)
        ]
        runs = [asyncio.create_task(c.run()) for c in clients]
        await actor.start_training(training_id)
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout=120)
        assert all(r.state == "COMPLETED" for r in results), results
        run.training = await actor.get_training(training_id)
        run.rounds = await actor.get_rounds(training_id)
        run.models = [await actor.download_model(r["model_id"]) for r in run.rounds]
        return run
    finally:
        await actor.aclose()


async def round_updates(server: EmbeddedServer, training_id: UUID, round_: int) -> list[tuple[State, int]]:
    """A round's stored updates in the order the orchestrator hands them to the aggregator."""
    assert server.runtime is not None
    async with server.runtime.uow() as uow:
        rows = (
            await uow.session.scalars(
                select(ClientUpdate)
                .where(ClientUpdate.training_id == training_id, ClientUpdate.round == round_)
                .order_by(ClientUpdate.client_id)
            )
        ).all()
    return [
        (records_to_state_dict(decode_tensors(await server.runtime.blobs.get(r.blob_key))), r.num_examples)
        for r in rows
    ]


def assert_close(a: State, b: State, atol: float) -> None:
    """Same names in the same order, values within `atol`."""
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.fixture
async def server(tmp_path):
    """An embedded fedhub."""
    settings = EmbeddedSettings(data_dir=tmp_path, log_level="WARNING", deadline_tick_s=0.2)
    async with EmbeddedServer(settings) as running:
        yield running


async def test_fedadam_carries_its_server_state_across_three_rounds(server: EmbeddedServer) -> None:
    """Each round's moments are stored with its model and read by the next: the models equal an
    offline FedAdam chain fed the same updates, and not a chain that forgets its state."""
    workload = DemoWorkload.create(3, seed=2)
    initial = workload.initial_weights()
    params = {"server_lr": 0.05, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    run = await train(
        server,
        workload,
        rounds=3,
        initial=initial,
        aggregation="fedadam",
        aggregation_params=params,
        delete_local_models_after_aggregation=False,
    )
    training_id = UUID(str(run.training["id"]))
    assert [r["num_updates"] for r in run.rounds] == [3, 3, 3]
    assert server.runtime is not None
    async with server.runtime.uow() as uow:
        rows = [await uow.session.get(Model, UUID(r["model_id"])) for r in run.rounds]
    state_keys = [row.state_blob_key for row in rows if row is not None]
    assert len(set(state_keys)) == 3 and None not in state_keys

    fedadam = METHODS[AggregationMethod.FEDADAM]
    typed = method_params("fedadam", params)
    base, state = initial, {}
    for round_, served in enumerate(run.models, start=1):
        updates = await round_updates(server, training_id, round_)

        def aggregate(
            with_state: dict[str, torch.Tensor],
            base: State = base,
            round_: int = round_,
            updates: list[tuple[State, int]] = updates,
        ) -> Any:
            ctx = RoundContext(
                base=base, device=torch.device("cpu"), state=with_state, seed=round_seed(training_id, round_)
            )
            method = fedadam(ctx, typed)
            for update, n in updates:
                method.add(update, float(n))
            return method.result()

        expected = aggregate(state)
        assert_close(served, expected.model, atol=1e-6)
        if round_ > 1:
            forgetful = aggregate({}).model
            assert any((forgetful[k] - served[k]).abs().max() > 1e-4 for k in served), round_
        base, state = expected.model, expected.state
    initial_acc, _ = workload.global_accuracy(initial)
    final_acc, _ = workload.global_accuracy(run.models[-1])
    assert final_acc > initial_acc


async def test_delta_uploads_with_excluded_tensors_match_weight_uploads(server: EmbeddedServer) -> None:
    """Two trainings from the same start, one uploading weights and one deltas, both leaving `2.bias`
    out: the same models round after round, with `2.bias` kept at its initial value."""
    workload = DemoWorkload.create(3, seed=4)
    initial = workload.initial_weights()
    common = {"rounds": 2, "initial": initial, "exclude_vars": r"^2\.bias$"}
    weights = await train(server, workload, update_kind="weights", **common)
    deltas = await train(
        server, workload, update_kind="delta", delete_local_models_after_aggregation=False, **common
    )
    assert deltas.training["client_config"] == {"update_kind": "delta", "exclude_vars": r"^2\.bias$"}
    for a, b in zip(weights.models, deltas.models, strict=True):
        assert_close(a, b, atol=1e-5)
        assert torch.equal(a["2.bias"], initial["2.bias"])
        assert torch.equal(b["2.bias"], initial["2.bias"])
    assert not torch.equal(weights.models[-1]["2.weight"], initial["2.weight"])
    # What the clients uploaded left 2.bias out (it would have been refused otherwise) and was a delta.
    updates = await round_updates(server, UUID(str(deltas.training["id"])), 1)
    assert all("2.bias" not in u for u, _ in updates)
    sent = sorted((u["0.weight"] for u, _ in updates), key=lambda t: float(t.sum()))
    fitted = sorted(
        (deltas.fitted[(i, 1)]["0.weight"] - initial["0.weight"] for i in range(3)),
        key=lambda t: float(t.sum()),
    )
    for s, f in zip(sent, fitted, strict=True):
        torch.testing.assert_close(s, f, rtol=0, atol=1e-6)


async def test_an_update_beyond_the_norm_bound_is_left_out_and_the_training_completes(
    server: EmbeddedServer,
) -> None:
    """A client scaling its weights 50x is rejected every round with its reason; the others train on."""
    workload = DemoWorkload.create(3, seed=5)
    initial = workload.initial_weights()

    def scale_client_two(index: int, new: State) -> State:
        return {k: v * 50 for k, v in new.items()} if index == 2 else new

    run = await train(
        server, workload, rounds=2, initial=initial, tamper=scale_client_two, max_update_norm=25.0
    )
    cheater = run.clients[2]
    for r in run.rounds:
        assert r["num_updates"] == 2
        (rejected,) = r["rejected"]
        assert rejected["client_id"] == str(cheater)
        assert "exceeds max_update_norm 25" in rejected["reason"]
    honest, _ = workload.global_accuracy(run.models[-1])
    assert honest > workload.global_accuracy(initial)[0]
    expected = {
        k: (
            run.fitted[(0, 1)][k] * len(workload.clients[0].train)
            + run.fitted[(1, 1)][k] * len(workload.clients[1].train)
        )
        / (len(workload.clients[0].train) + len(workload.clients[1].train))
        for k in initial
    }
    assert_close(run.models[0], expected, atol=1e-5)


async def test_an_ensemble_training_exposes_its_members(server: EmbeddedServer) -> None:
    """aggregation=ensemble: the round's model lists one member per client, each the client's model."""
    workload = DemoWorkload.create(3, seed=6)
    initial = workload.initial_weights()
    run = await train(server, workload, rounds=1, initial=initial, aggregation="ensemble")
    model_id = run.rounds[0]["model_id"]
    actor = ActorClient(server.base_url, server.admin_token)
    try:
        info = await actor.get_model(model_id)
        assert info.num_members == 3
        assert info.record is not None and info.record.get("members") == 3
        members = await actor.get_members(model_id)
        assert [m["index"] for m in members] == [0, 1, 2]
        by_client = {UUID(m["client_id"]): m["index"] for m in members}
        assert set(by_client) == set(run.clients)
        for i, client in enumerate(run.clients):
            member = await actor.download_member(model_id, by_client[client])
            assert_close(member, run.fitted[(i, 1)], atol=0)
    finally:
        await actor.aclose()
