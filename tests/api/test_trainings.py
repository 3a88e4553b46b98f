"""Creating, reading and starting trainings, and the rounds summary."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest

from shared.db import models as db
from shared.enums import RoundPhase, TrainingState
from shared.events import StartTraining, utcnow
from tests.api.conftest import World
from tests.api.helpers import Fedhub, model_tensors, msgpack_body


async def test_create_training_applies_the_documented_defaults(fedhub: Fedhub) -> None:
    """A new training is INITIAL in round 0 over its model, with the seed's defaults."""
    alice, bob = await fedhub.principal(name="alice"), await fedhub.principal(name="bob")
    model = await fedhub.upload_model()
    training = await fedhub.create_training(model["id"], [alice.id, bob.id], rounds=3)
    assert training["state"] == "INITIAL"
    assert training["phase"] is None
    assert training["round"] == 0
    assert training["rounds"] == 3
    assert training["aggregation"] == "fedavg"
    assert training["min_clients"] == 2
    assert training["round_timeout_s"] == 600
    assert training["skip_model_tests"] is False
    assert training["model_test_after_each_round"] is True
    assert training["delete_local_models_after_aggregation"] is True
    assert training["initial_model_id"] == training["current_model_id"] == model["id"]
    assert sorted(training["participants"]) == sorted([alice.id, bob.id])
    assert training["uploaded"] == training["tested"] == []
    assert await fedhub.count(db.Participant, training_id=UUID(training["id"])) == 2


async def test_create_training_stores_and_returns_non_default_trainer_options(fedhub: Fedhub) -> None:
    """The seed's trainer options, each set against its default, are stored and shown on every read."""
    alice = await fedhub.principal(name="alice")
    model = await fedhub.upload_model()
    options = {
        "skip_model_tests": True,
        "model_test_after_each_round": False,
        "delete_local_models_after_aggregation": False,
    }
    created = await fedhub.create_training(model["id"], [alice.id], **options)
    read = await fedhub.http.get(f"/v1/trainings/{created['id']}", headers=alice.headers)
    assert read.status_code == 200
    for training in (created, read.json()):
        assert {k: training[k] for k in options} == options
    async with fedhub.runtime.uow() as uow:
        row = await uow.session.get(db.Training, UUID(created["id"]))
        assert row is not None
        assert (
            row.skip_model_tests,
            row.model_test_after_each_round,
            row.delete_local_models_after_aggregation,
        ) == (True, False, False)


async def test_owner_and_participants_read_a_training_others_get_404(world: World) -> None:
    """The owner and participants see the training; an outsider client and another actor do not."""
    fedhub = world.fedhub
    other_actor = await fedhub.principal(role="actor", name="other")
    for who in (fedhub.admin, world.alice, world.bob):
        resp = await fedhub.http.get(f"/v1/trainings/{world.training_id}", headers=who.headers)
        assert resp.status_code == 200
        assert resp.json()["id"] == world.training_id
        assert resp.json()["state"] == "ONGOING"
    for who in (world.outsider, other_actor):
        resp = await fedhub.http.get(f"/v1/trainings/{world.training_id}", headers=who.headers)
        assert resp.status_code == 404
        assert resp.json()["error"] == "NotFound"


async def test_a_participant_sees_itself_alone_in_the_lists_the_owner_sees_all(world: World) -> None:
    """Clients learn nothing of each other: `participants`, `uploaded` and `tested` hold only the
    reading participant (once it has reported); the owner sees every client."""
    fedhub = world.fedhub
    url = f"/v1/trainings/{world.training_id}"
    resp = await fedhub.http.post(
        f"{url}/updates",
        content=msgpack_body(model_tensors(), round=1, num_examples=3),
        headers={**world.bob.headers, "Content-Type": "application/msgpack"},
    )
    assert resp.status_code == 201, resp.text

    owner = (await fedhub.http.get(url, headers=fedhub.admin.headers)).json()
    assert sorted(owner["participants"]) == sorted([world.alice.id, world.bob.id])
    assert owner["uploaded"] == [world.bob.id]
    bob = (await fedhub.http.get(url, headers=world.bob.headers)).json()
    assert (bob["participants"], bob["uploaded"], bob["tested"]) == ([world.bob.id], [world.bob.id], [])
    alice = (await fedhub.http.get(url, headers=world.alice.headers)).json()
    assert (alice["participants"], alice["uploaded"], alice["tested"]) == ([world.alice.id], [], [])


async def test_start_is_accepted_once_and_emits_start_training(fedhub: Fedhub) -> None:
    """Start answers 202 and publishes StartTraining; once the training moved on, a second start is 409."""
    alice = await fedhub.principal()
    model = await fedhub.upload_model()
    training = await fedhub.create_training(model["id"], [alice.id])
    resp = await fedhub.http.post(f"/v1/trainings/{training['id']}/start", headers=fedhub.admin.headers)
    assert resp.status_code == 202
    assert resp.json()["id"] == training["id"]
    assert resp.json()["state"] == "INITIAL"

    started = await fedhub.published(StartTraining)
    assert started == [StartTraining(training_id=UUID(training["id"]), requested_by=UUID(fedhub.admin.id))]

    # What the orchestrator does on StartTraining.
    await fedhub.set_round(training["id"], state=TrainingState.ONGOING, phase=RoundPhase.COLLECTING)
    again = await fedhub.http.post(f"/v1/trainings/{training['id']}/start", headers=fedhub.admin.headers)
    assert again.status_code == 409
    assert again.json()["error"] == "IllegalTransition"
    assert "ONGOING" in again.json()["detail"]
    assert len(await fedhub.published(StartTraining)) == 1


async def test_second_start_while_the_first_is_pending_is_409(fedhub: Fedhub) -> None:
    """With the first StartTraining still in the outbox, a second start is refused; one row remains."""
    await fedhub.runtime.relay.stop()  # keep outbox rows where they are
    alice = await fedhub.principal()
    model = await fedhub.upload_model()
    training = await fedhub.create_training(model["id"], [alice.id])
    first = await fedhub.http.post(f"/v1/trainings/{training['id']}/start", headers=fedhub.admin.headers)
    second = await fedhub.http.post(f"/v1/trainings/{training['id']}/start", headers=fedhub.admin.headers)
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["error"] == "IllegalTransition"
    assert training["id"] in second.json()["detail"]
    assert await fedhub.count(db.OutboxMessage, type="StartTraining") == 1


async def test_only_the_owner_may_start(world: World) -> None:
    """A client is 403 (role), another actor 404 (the training is not theirs); nothing is emitted."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, state=TrainingState.INITIAL, phase=None, round=0)
    other_actor = await fedhub.principal(role="actor", name="other")
    by_client = await fedhub.http.post(
        f"/v1/trainings/{world.training_id}/start", headers=world.alice.headers
    )
    assert by_client.status_code == 403
    assert by_client.json()["error"] == "Forbidden"
    by_other = await fedhub.http.post(f"/v1/trainings/{world.training_id}/start", headers=other_actor.headers)
    assert by_other.status_code == 404
    assert await fedhub.published(StartTraining) == []


async def _training_body(fedhub: Fedhub, **overrides: Any) -> dict[str, Any]:
    alice, bob = await fedhub.principal(name="alice"), await fedhub.principal(name="bob")
    model = await fedhub.upload_model()
    return {
        "model_id": model["id"],
        "clients": [alice.id, bob.id],
        "aggregation": "fedavg",
        "rounds": 2,
        **overrides,
    }


@pytest.mark.parametrize(
    ("change", "status", "error", "needle"),
    [
        ({"min_clients": 3}, 422, "ValidationError", "min_clients 3 exceeds the 2 clients"),
        ({"min_clients": 0}, 422, "ValidationError", "min_clients"),
        ({"rounds": 0}, 422, "ValidationError", "rounds"),
        ({"round_timeout_s": 0}, 422, "ValidationError", "round_timeout_s"),
        ({"aggregation": "median-of-vibes"}, 422, "ValidationError", "aggregation"),
        ({"clients": []}, 422, "ValidationError", "clients"),
        ({"model_id": "00000000-0000-4000-8000-000000000000"}, 404, "NotFound", "00000000-0000-4000-8000"),
    ],
    ids=[
        "min-clients-too-large",
        "min-clients-zero",
        "no-rounds",
        "no-timeout",
        "aggregation",
        "no-clients",
        "model",
    ],
)
async def test_invalid_training_is_refused_and_creates_nothing(
    fedhub: Fedhub, change: dict[str, Any], status: int, error: str, needle: str
) -> None:
    """Each broken rule is answered with its named error; no training or participant row is written."""
    body = {**await _training_body(fedhub), **change}
    resp = await fedhub.http.post("/v1/trainings", json=body, headers=fedhub.admin.headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert needle in resp.json()["detail"]
    assert await fedhub.count(db.Training) == 0
    assert await fedhub.count(db.Participant) == 0


async def test_unknown_or_non_client_ids_are_named(fedhub: Fedhub) -> None:
    """Ids that are no client (unknown, or an actor's) are listed in the 404; nothing is created."""
    body = await _training_body(fedhub)
    ghost = str(uuid4())
    actor = await fedhub.principal(role="actor", name="not-a-client")
    body["clients"] = [*body["clients"], ghost, actor.id]
    resp = await fedhub.http.post("/v1/trainings", json=body, headers=fedhub.admin.headers)
    assert resp.status_code == 404
    assert resp.json()["error"] == "NotFound"
    assert ghost in resp.json()["detail"]
    assert actor.id in resp.json()["detail"]
    assert body["clients"][0] not in resp.json()["detail"]
    assert await fedhub.count(db.Training) == 0


async def test_repeated_client_ids_are_refused(fedhub: Fedhub) -> None:
    """A client listed twice is a 422 naming it."""
    body = await _training_body(fedhub)
    body["clients"] = [body["clients"][0], body["clients"][0]]
    resp = await fedhub.http.post("/v1/trainings", json=body, headers=fedhub.admin.headers)
    assert resp.status_code == 422
    assert body["clients"][0] in resp.json()["detail"]
    assert await fedhub.count(db.Training) == 0


async def test_rounds_report_example_weighted_metrics(world: World) -> None:
    """Round 1's train and test metrics are the means of the clients' reports weighted by their examples."""
    fedhub, tid = world.fedhub, world.training_id
    for who, n, loss in ((world.alice, 10, 1.0), (world.bob, 30, 3.0)):
        resp = await fedhub.http.post(
            f"/v1/trainings/{tid}/updates",
            content=msgpack_body(
                model_tensors(),
                round=1,
                num_examples=n,
                metrics={"loss": loss, "only_alice": 5} if who is world.alice else {"loss": loss},
            ),
            headers={**who.headers, "Content-Type": "application/msgpack"},
        )
        assert resp.status_code == 201, resp.text
    await fedhub.set_round(tid, phase=RoundPhase.TESTING)
    for who, n, acc in ((world.alice, 1, 0.5), (world.bob, 3, 0.9)):
        resp = await fedhub.http.post(
            f"/v1/trainings/{tid}/test-metrics",
            json={"round": 1, "num_examples": n, "metrics": {"accuracy": acc}},
            headers=who.headers,
        )
        assert resp.status_code == 201, resp.text
    async with fedhub.runtime.uow() as uow:  # the orchestrator's record of the round
        uow.session.add(
            db.TrainingRound(
                training_id=UUID(tid), round=1, started_at=utcnow(), num_updates=2, num_examples=40
            )
        )

    resp = await fedhub.http.get(f"/v1/trainings/{tid}/rounds", headers=world.alice.headers)
    assert resp.status_code == 200
    (round1,) = resp.json()
    assert round1["round"] == 1
    assert round1["num_updates"] == 2
    assert round1["num_examples"] == 40
    assert round1["train_metrics"] == {"loss": pytest.approx((10 * 1.0 + 30 * 3.0) / 40), "only_alice": 5}
    assert round1["test_metrics"] == {"accuracy": pytest.approx((1 * 0.5 + 3 * 0.9) / 4)}

    training = (await fedhub.http.get(f"/v1/trainings/{tid}", headers=fedhub.admin.headers)).json()
    assert sorted(training["uploaded"]) == sorted([world.alice.id, world.bob.id])
    assert sorted(training["tested"]) == sorted([world.alice.id, world.bob.id])
