"""Model upload, metadata and weights in both encodings, and who may read them."""

from __future__ import annotations

import base64
import hashlib
from uuid import UUID

import httpx
import numpy as np
import pytest

from services.api.main import create_app
from shared.codec import decode_tensors, encode_tensors
from shared.db.models import Model
from tests.api.conftest import World, api_settings
from tests.api.helpers import (
    BF16_NAN,
    MSGPACK,
    Fedhub,
    blob_files,
    json_body,
    model_tensors,
    msgpack_body,
    record,
)


async def test_upload_msgpack_model_and_read_it_back(fedhub: Fedhub) -> None:
    """A msgpack upload is stored canonically, content addressed, and served back byte for byte."""
    tensors = model_tensors()
    canonical = encode_tensors(tensors.values())
    resp = await fedhub.http.post(
        "/v1/models",
        content=msgpack_body(tensors, name="tiny"),
        headers={**fedhub.admin.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["name"] == "tiny"
    assert model["digest"] == hashlib.sha256(canonical).hexdigest()
    assert model["size_bytes"] == len(canonical)
    assert model["spec"] == {
        "w": {"dtype": "float32", "shape": [2, 3]},
        "b": {"dtype": "float32", "shape": [3]},
        "h": {"dtype": "float16", "shape": [4]},
        "g": {"dtype": "bfloat16", "shape": [2]},
        "steps": {"dtype": "int64", "shape": [1]},
    }
    assert model["training_id"] is None
    assert model["round"] is None
    assert (fedhub.blob_root / "sha256" / model["digest"]).read_bytes() == canonical

    got = await fedhub.http.get(f"/v1/models/{model['id']}", headers=fedhub.admin.headers)
    assert got.status_code == 200
    assert got.json() == model

    weights = await fedhub.http.get(f"/v1/models/{model['id']}/weights", headers=fedhub.admin.headers)
    assert weights.status_code == 200
    assert weights.headers["content-type"] == MSGPACK
    assert weights.content == canonical


async def test_upload_json_base64_model_equals_the_msgpack_upload(fedhub: Fedhub) -> None:
    """JSON+base64 carries the same tensors: same canonical bytes, same digest; weights come back as JSON."""
    tensors = model_tensors(scale=3.0)
    resp = await fedhub.http.post(
        "/v1/models",
        content=json_body(tensors),
        headers={**fedhub.admin.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["digest"] == hashlib.sha256(encode_tensors(tensors.values())).hexdigest()

    again = await fedhub.upload_model(tensors)
    assert again["digest"] == model["digest"]
    assert again["id"] != model["id"]

    as_json = await fedhub.http.get(
        f"/v1/models/{model['id']}/weights", headers={**fedhub.admin.headers, "Accept": "application/json"}
    )
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == "application/json"
    body = as_json.json()["tensors"]
    assert list(body) == list(tensors)
    for name, rec in tensors.items():
        assert body[name]["dtype"] == rec.dtype
        assert body[name]["shape"] == list(rec.shape)
        assert base64.b64decode(body[name]["data"]) == bytes(rec.data)

    as_msgpack = await fedhub.http.get(f"/v1/models/{model['id']}/weights", headers=fedhub.admin.headers)
    decoded = {r.name: r for r in decode_tensors(as_msgpack.content)}
    assert {n: bytes(r.data) for n, r in decoded.items()} == {n: bytes(r.data) for n, r in tensors.items()}


@pytest.mark.parametrize(
    ("content", "content_type", "status", "error", "needle"),
    [
        (b"\xc1 definitely not msgpack", MSGPACK, 400, "MalformedPayload", "not valid msgpack"),
        (b"{not json", "application/json", 400, "MalformedPayload", "not valid JSON"),
        (
            b'{"tensors": {"w": {"dtype": "float32", "shape": [1], "data": "@@@"}}}',
            "application/json",
            400,
            "MalformedPayload",
            "base64",
        ),
        (
            msgpack_body({"w": record("w", np.array([np.nan], np.float32))}),
            MSGPACK,
            422,
            "NonFiniteValues",
            "'w'",
        ),
        (
            msgpack_body({"g": record("g", np.array([BF16_NAN], np.uint16), dtype="bfloat16")}),
            MSGPACK,
            422,
            "NonFiniteValues",
            "'g'",
        ),
        (msgpack_body({}), MSGPACK, 400, "MalformedPayload", "non-empty map"),
        (msgpack_body(model_tensors()), "text/plain", 415, "UnsupportedMediaType", "text/plain"),
    ],
    ids=["not-msgpack", "not-json", "bad-base64", "nan", "bfloat16-nan", "no-tensors", "text-plain"],
)
async def test_bad_model_upload_is_refused_and_leaves_nothing(
    fedhub: Fedhub, content: bytes, content_type: str, status: int, error: str, needle: str
) -> None:
    """Each bad model is answered with its named error and leaves no row and no blob."""
    resp = await fedhub.http.post(
        "/v1/models", content=content, headers={**fedhub.admin.headers, "Content-Type": content_type}
    )
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert needle in resp.json()["detail"]
    assert await fedhub.count(Model) == 0
    assert blob_files(fedhub.blob_root) == set()


async def test_clients_may_not_upload_models(fedhub: Fedhub) -> None:
    """Model upload needs the actor role."""
    client = await fedhub.principal()
    resp = await fedhub.http.post(
        "/v1/models",
        content=msgpack_body(model_tensors()),
        headers={**client.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 403
    assert resp.json()["error"] == "Forbidden"


async def test_upload_larger_than_the_limit_is_413(fedhub: Fedhub) -> None:
    """A body over `max_upload_bytes` is refused before it is decoded."""
    app = create_app(api_settings(fedhub.runtime, max_upload_bytes=64), fedhub.runtime)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        resp = await http.post(
            "/v1/models",
            content=msgpack_body(model_tensors()),
            headers={**fedhub.admin.headers, "Content-Type": MSGPACK},
        )
    assert resp.status_code == 413
    assert resp.json()["error"] == "PayloadTooLarge"
    assert await fedhub.count(Model) == 0


async def test_participants_read_their_trainings_model_and_nobody_else(world: World) -> None:
    """A participant reads the training's model and weights; an outsider client gets 404 for both."""
    fedhub, model_id = world.fedhub, world.model["id"]
    meta = await fedhub.http.get(f"/v1/models/{model_id}", headers=world.alice.headers)
    assert meta.status_code == 200
    weights = await fedhub.http.get(f"/v1/models/{model_id}/weights", headers=world.alice.headers)
    assert weights.status_code == 200
    assert weights.content == encode_tensors(model_tensors().values())

    for path in (f"/v1/models/{model_id}", f"/v1/models/{model_id}/weights"):
        resp = await fedhub.http.get(path, headers=world.outsider.headers)
        assert resp.status_code == 404
        assert resp.json()["error"] == "NotFound"
        assert str(model_id) in resp.json()["detail"]


async def test_clients_read_the_models_their_trainings_produced(world: World) -> None:
    """A round's global model (its `training_id` names the training) is readable by participants only."""
    fedhub = world.fedhub
    async with fedhub.runtime.uow() as uow:  # what the aggregator records for a round
        source = await uow.session.get(Model, UUID(str(world.model["id"])))
        assert source is not None
        produced = Model(
            name="round-1",
            blob_key=source.blob_key,
            digest=source.digest,
            size_bytes=source.size_bytes,
            spec=source.spec,
            training_id=UUID(world.training_id),
            round=1,
        )
        uow.session.add(produced)
    resp = await fedhub.http.get(f"/v1/models/{produced.id}", headers=world.bob.headers)
    assert resp.status_code == 200
    assert resp.json()["training_id"] == world.training_id
    assert resp.json()["round"] == 1
    outsider = await fedhub.http.get(f"/v1/models/{produced.id}/weights", headers=world.outsider.headers)
    assert outsider.status_code == 404
