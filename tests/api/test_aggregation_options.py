"""A training's aggregation options through the API: validation, storage, client config, excluded
tensors in uploads, model records, ensemble members and rejected updates in the rounds."""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID, uuid4

import pytest

from shared.blobs import content_key
from shared.codec import decode_tensors, encode_tensors
from shared.db import models as db
from shared.events import utcnow
from tests.api.helpers import MSGPACK, Fedhub, json_body, model_tensors, msgpack_body


async def _create(fedhub: Fedhub, **fields: Any) -> tuple[int, dict[str, Any], str]:
    """POST a training with `fields` over a fresh model and client; (status, answer, model id)."""
    client = await fedhub.principal()
    model = await fedhub.upload_model()
    body = {"model_id": model["id"], "clients": [client.id], "rounds": 1, **fields}
    resp = await fedhub.http.post("/v1/trainings", json=body, headers=fedhub.admin.headers)
    return resp.status_code, resp.json(), model["id"]


async def test_aggregation_options_are_stored_and_shown_with_defaults(fedhub: Fedhub) -> None:
    """The method's parameters come back with defaults filled in; clients' config names what they need."""
    status, training, _ = await _create(
        fedhub,
        aggregation="fedprox",
        aggregation_params={"mu": 0.25},
        update_kind="delta",
        exclude_vars=r"^s",
        max_update_norm=5,
    )
    assert status == 201, training
    assert training["aggregation"] == "fedprox"
    assert training["aggregation_params"] == {"mu": 0.25}
    assert (training["update_kind"], training["exclude_vars"], training["max_update_norm"]) == (
        "delta",
        "^s",
        5,
    )
    assert training["client_config"] == {"update_kind": "delta", "exclude_vars": "^s", "mu": 0.25}
    again = await fedhub.http.get(f"/v1/trainings/{training['id']}", headers=fedhub.admin.headers)
    assert again.json() == training

    status, adam, _ = await _create(fedhub, aggregation="fedadam", aggregation_params={"beta1": 0.5})
    assert status == 201
    assert adam["aggregation_params"] == {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.99, "tau": 1e-9}
    assert adam["client_config"] == {"update_kind": "weights", "exclude_vars": None}
    assert (adam["update_kind"], adam["exclude_vars"], adam["max_update_norm"]) == ("weights", None, None)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"aggregation": "fedsgd"}, "unknown aggregation method 'fedsgd'"),
        ({"aggregation": "trimmed_mean", "aggregation_params": {"beta": 0.5}}, "beta"),
        ({"aggregation": "krum", "aggregation_params": {"f": 1, "byzantine": 2}}, "byzantine"),
        ({"aggregation": "fedavg", "aggregation_params": {"mu": 0.1}}, "mu"),
        ({"exclude_vars": "(unclosed"}, "exclude_vars '(unclosed' is not a valid regular expression"),
        ({"exclude_vars": "."}, "matches every tensor"),
        ({"update_kind": "gradients"}, "update_kind"),
        ({"max_update_norm": 0}, "max_update_norm"),
        ({"aggregation_params": [1, 2]}, "aggregation_params"),
    ],
    ids=[
        "method",
        "param-range",
        "param-unknown",
        "param-other-method",
        "regex",
        "regex-all",
        "kind",
        "norm",
        "params-type",
    ],
)
async def test_a_bad_aggregation_option_is_422_naming_it_and_leaves_no_row(
    fedhub: Fedhub, fields: dict[str, Any], says: str
) -> None:
    """Every bad method, parameter, regex or bound is refused before anything is stored."""
    status, answer, _ = await _create(fedhub, **fields)
    assert status == 422, answer
    assert answer["error"] == "ValidationError"
    assert says in answer["detail"]
    assert await fedhub.count(db.Training) == 0


async def _world(fedhub: Fedhub, **fields: Any) -> tuple[str, Any]:
    """A collecting training over `model_tensors()` with one participant, created with `fields`."""
    client = await fedhub.principal()
    model = await fedhub.upload_model()
    training = await fedhub.create_training(model["id"], [client.id], **fields)
    await fedhub.set_round(training["id"])
    return training["id"], client


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_an_upload_carrying_an_excluded_tensor_is_refused_naming_it(
    fedhub: Fedhub, encoding: str
) -> None:
    """With exclude_vars, the excluded tensors must be left out: sending one is a 422 naming it."""
    training_id, client = await _world(fedhub, exclude_vars="^steps$")
    tensors = model_tensors(scale=2.0)
    build, media = (msgpack_body, MSGPACK) if encoding == "msgpack" else (json_body, "application/json")
    resp = await fedhub.http.post(
        f"/v1/trainings/{training_id}/updates",
        content=build(tensors, round=1, num_examples=3),
        headers={**client.headers, "Content-Type": media},
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"] == "TensorSpecMismatch"
    assert "'steps'" in resp.json()["detail"] and "exclude_vars" in resp.json()["detail"]
    assert await fedhub.count(db.ClientUpdate) == 0


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_an_upload_without_the_excluded_tensors_is_stored_without_them(
    fedhub: Fedhub, encoding: str
) -> None:
    """The rest of the model is still required, and stored in the model's order."""
    training_id, client = await _world(fedhub, exclude_vars="^(steps|g)$", update_kind="delta")
    tensors = {k: v for k, v in model_tensors(scale=2.0).items() if k not in ("steps", "g")}
    build, media = (msgpack_body, MSGPACK) if encoding == "msgpack" else (json_body, "application/json")
    missing = {k: v for k, v in tensors.items() if k != "b"}
    resp = await fedhub.http.post(
        f"/v1/trainings/{training_id}/updates",
        content=build(missing, round=1, num_examples=3),
        headers={**client.headers, "Content-Type": media},
    )
    assert resp.status_code == 422 and "missing tensor names: b" in resp.json()["detail"]
    resp = await fedhub.http.post(
        f"/v1/trainings/{training_id}/updates",
        content=build(tensors, round=1, num_examples=3),
        headers={**client.headers, "Content-Type": media},
    )
    assert resp.status_code == 201, resp.text
    stored = (fedhub.blob_root / "update" / resp.json()["update_id"]).read_bytes()
    assert [r.name for r in decode_tensors(stored)] == ["w", "b", "h"]


async def _round_model(fedhub: Fedhub, training_id: str, owner_id: str, *, members: int = 0) -> UUID:
    """Write what the aggregator writes for round 1: a model row with a record, state and members."""
    data = encode_tensors(model_tensors(scale=3.0).values())
    key, digest = content_key(data)
    await fedhub.runtime.blobs.put(key, data)
    model_id = uuid4()
    async with fedhub.runtime.uow() as uow:
        uow.session.add(
            db.Model(
                id=model_id,
                name="round-1",
                owner_id=UUID(owner_id),
                blob_key=key,
                digest=digest,
                size_bytes=len(data),
                spec={},
                training_id=UUID(training_id),
                round=1,
                record={"selected": [0, 2], "noise_std": 0.5},
            )
        )
        await uow.session.flush()
        for i in range(members):
            member = encode_tensors(model_tensors(scale=float(i)).values())
            member_key, member_digest = content_key(member)
            await fedhub.runtime.blobs.put(member_key, member)
            uow.session.add(
                db.ModelMember(
                    model_id=model_id,
                    index=i,
                    blob_key=member_key,
                    digest=member_digest,
                    size_bytes=len(member),
                    update_id=None,
                    client_id=None,
                )
            )
    return model_id


async def test_a_models_record_and_its_members_are_readable(fedhub: Fedhub) -> None:
    """GET model shows the record and member count; members list and download like model weights."""
    training_id, client = await _world(fedhub, aggregation="ensemble")
    model_id = await _round_model(fedhub, training_id, fedhub.admin.id, members=2)
    for who in (fedhub.admin, client):
        info = (await fedhub.http.get(f"/v1/models/{model_id}", headers=who.headers)).json()
        assert info["record"] == {"selected": [0, 2], "noise_std": 0.5}
        assert info["num_members"] == 2
    listed = (await fedhub.http.get(f"/v1/models/{model_id}/members", headers=client.headers)).json()
    assert [m["index"] for m in listed] == [0, 1]
    for i, member in enumerate(listed):
        resp = await fedhub.http.get(f"/v1/models/{model_id}/members/{i}", headers=client.headers)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == MSGPACK
        assert resp.content == encode_tensors(model_tensors(scale=float(i)).values())
        assert member["digest"] == hashlib.sha256(resp.content).hexdigest()
        as_json = await fedhub.http.get(
            f"/v1/models/{model_id}/members/{i}", headers={**client.headers, "Accept": "application/json"}
        )
        assert set(as_json.json()["tensors"]) == set(model_tensors())
    missing = await fedhub.http.get(f"/v1/models/{model_id}/members/2", headers=client.headers)
    assert missing.status_code == 404 and "no member 2" in missing.json()["detail"]
    outsider = await fedhub.principal(name="outsider")
    hidden = await fedhub.http.get(f"/v1/models/{model_id}/members", headers=outsider.headers)
    assert hidden.status_code == 404


async def test_an_uploaded_model_has_no_record_and_no_members(fedhub: Fedhub) -> None:
    """A model that no round produced: record null, no members, an empty member list."""
    model = await fedhub.upload_model()
    assert (model["record"], model["num_members"]) == (None, 0)
    listed = await fedhub.http.get(f"/v1/models/{model['id']}/members", headers=fedhub.admin.headers)
    assert listed.json() == []


async def test_rounds_show_rejected_updates_and_leave_their_metrics_out(fedhub: Fedhub) -> None:
    """A rejected update appears with its reason; the round's train metrics count only aggregated ones."""
    alice, bob = await fedhub.principal(name="alice"), await fedhub.principal(name="bob")
    model = await fedhub.upload_model()
    training = await fedhub.create_training(model["id"], [alice.id, bob.id])
    training_id = UUID(training["id"])
    rejected_id = uuid4()
    async with fedhub.runtime.uow() as uow:
        uow.session.add(db.TrainingRound(training_id=training_id, round=1, started_at=utcnow()))
        for client, loss, reason, update_id in (
            (alice, 0.5, None, uuid4()),
            (bob, 9.0, "update norm 12 exceeds max_update_norm 5", rejected_id),
        ):
            uow.session.add(
                db.ClientUpdate(
                    id=update_id,
                    training_id=training_id,
                    round=1,
                    client_id=UUID(client.id),
                    blob_key=f"update/{update_id}",
                    digest="0" * 64,
                    num_examples=10,
                    metrics={"loss": loss},
                    rejected_reason=reason,
                )
            )
    (round1,) = (await fedhub.http.get(f"/v1/trainings/{training_id}/rounds", headers=alice.headers)).json()
    assert round1["train_metrics"] == {"loss": 0.5}
    assert round1["rejected"] == [
        {
            "update_id": str(rejected_id),
            "client_id": bob.id,
            "reason": "update norm 12 exceeds max_update_norm 5",
        }
    ]
