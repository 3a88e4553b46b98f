"""Cancelling a training: owner only, idempotent, refused once it finished; late reports get 409."""

from __future__ import annotations

from uuid import UUID

import pytest

from shared.db import models as db
from shared.enums import TrainingState
from shared.events import CancelTraining
from tests.api.conftest import World
from tests.api.helpers import MSGPACK, model_tensors, msgpack_body


def _cancel_path(world: World) -> str:
    return f"/v1/trainings/{world.training_id}/cancel"


@pytest.fixture
async def fedhub_world_initial(world: World) -> World:
    """The world's training put back in INITIAL."""
    await world.fedhub.set_round(world.training_id, state=TrainingState.INITIAL, phase=None, round=0)
    return world


async def test_owner_cancel_is_accepted_and_emits_cancel_training(world: World) -> None:
    """The owner's cancel of an ONGOING training answers 202 with it and publishes CancelTraining."""
    fedhub = world.fedhub
    resp = await fedhub.http.post(_cancel_path(world), headers=fedhub.admin.headers)
    assert resp.status_code == 202, resp.text
    assert resp.json()["id"] == world.training_id
    assert resp.json()["state"] == "ONGOING"  # the orchestrator moves it
    assert await fedhub.published(CancelTraining) == [
        CancelTraining(training_id=UUID(world.training_id), requested_by=UUID(fedhub.admin.id))
    ]


async def test_cancel_of_an_initial_training_is_accepted(fedhub_world_initial: World) -> None:
    """INITIAL trainings can be cancelled too (before they ever start)."""
    world = fedhub_world_initial
    resp = await world.fedhub.http.post(_cancel_path(world), headers=world.fedhub.admin.headers)
    assert resp.status_code == 202
    assert resp.json()["state"] == "INITIAL"
    assert len(await world.fedhub.published(CancelTraining)) == 1


async def test_repeated_cancel_while_pending_adds_no_second_message(world: World) -> None:
    """With the first CancelTraining still in the outbox, a repeat is 202 again and leaves one row."""
    fedhub = world.fedhub
    await fedhub.runtime.relay.stop()  # keep outbox rows where they are
    first = await fedhub.http.post(_cancel_path(world), headers=fedhub.admin.headers)
    second = await fedhub.http.post(_cancel_path(world), headers=fedhub.admin.headers)
    assert (first.status_code, second.status_code) == (202, 202)
    assert await fedhub.count(db.OutboxMessage, type="CancelTraining") == 1


async def test_cancel_of_a_cancelled_training_is_200_with_the_training(world: World) -> None:
    """Idempotent: once CANCELLED, a cancel answers 200 with the training and emits nothing."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, state=TrainingState.CANCELLED, phase=None, round=1)
    for _ in range(2):
        resp = await fedhub.http.post(_cancel_path(world), headers=fedhub.admin.headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["id"] == world.training_id
        assert resp.json()["state"] == "CANCELLED"
    assert await fedhub.published(CancelTraining) == []


@pytest.mark.parametrize("state", [TrainingState.COMPLETED, TrainingState.FAILED])
async def test_cancel_of_a_finished_training_is_409_naming_its_state(
    world: World, state: TrainingState
) -> None:
    """COMPLETED and FAILED trainings cannot be cancelled: 409 IllegalTransition naming the state."""
    fedhub = world.fedhub
    await fedhub.set_round(world.training_id, state=state, phase=None, round=2)
    resp = await fedhub.http.post(_cancel_path(world), headers=fedhub.admin.headers)
    assert resp.status_code == 409
    assert resp.json()["error"] == "IllegalTransition"
    assert state.value in resp.json()["detail"] and world.training_id in resp.json()["detail"]
    assert await fedhub.published(CancelTraining) == []


async def test_only_the_owner_may_cancel(world: World) -> None:
    """As for start: a client (participant or not) is 403 (role), another actor 404; nothing is emitted."""
    fedhub = world.fedhub
    other_actor = await fedhub.principal(role="actor", name="other")
    for client in (world.alice, world.outsider):
        by_client = await fedhub.http.post(_cancel_path(world), headers=client.headers)
        assert by_client.status_code == 403
        assert by_client.json()["error"] == "Forbidden"
    by_other = await fedhub.http.post(_cancel_path(world), headers=other_actor.headers)
    assert by_other.status_code == 404
    assert by_other.json()["error"] == "NotFound"
    assert await fedhub.published(CancelTraining) == []
    training = (
        await fedhub.http.get(f"/v1/trainings/{world.training_id}", headers=fedhub.admin.headers)
    ).json()
    assert training["state"] == "ONGOING"


async def test_late_update_and_test_report_after_cancel_are_409_naming_the_state(world: World) -> None:
    """A cancelled training refuses its round's update and test report (RoundClosed naming CANCELLED)
    and records neither."""
    fedhub, tid = world.fedhub, world.training_id
    await fedhub.set_round(tid, state=TrainingState.CANCELLED, phase=None, round=1)
    upload = await fedhub.http.post(
        f"/v1/trainings/{tid}/updates",
        content=msgpack_body(model_tensors(), round=1, num_examples=10),
        headers={**world.alice.headers, "Content-Type": MSGPACK},
    )
    assert upload.status_code == 409, upload.text
    assert upload.json()["error"] == "RoundClosed"
    assert "CANCELLED" in upload.json()["detail"]
    report = await fedhub.http.post(
        f"/v1/trainings/{tid}/test-metrics",
        json={"round": 1, "num_examples": 10, "metrics": {"accuracy": 0.5}},
        headers=world.bob.headers,
    )
    assert report.status_code == 409, report.text
    assert report.json()["error"] == "RoundClosed"
    assert "CANCELLED" in report.json()["detail"]
    assert await fedhub.count(db.ClientUpdate, training_id=UUID(tid)) == 0
    assert await fedhub.count(db.TestMetric, training_id=UUID(tid)) == 0
