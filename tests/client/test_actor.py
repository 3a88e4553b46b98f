"""`ActorClient` and the shared transport: request shapes, retries, errors, watching events."""

from __future__ import annotations

import contextlib
import json
from uuid import UUID, uuid4

import httpx
import pytest
import torch

from fedhub.client import ActorClient, ClientError, RetryPolicy, ServerUnreachable
from shared.codec import decode_document, parse_tensor_map
from shared.tensors import records_to_state_dict

from .fakes import FAST, Hang, ScriptedServer, error_response, sse, weights_response

BASE = "http://fedhub.test/"
T = uuid4()


@pytest.fixture
async def actor(http):
    """An actor client over the scripted server."""
    client = ActorClient(BASE, "admin-token", http, retry=FAST)
    yield client
    await client.aclose()


async def test_create_principal_returns_its_token(server: ScriptedServer, actor):
    """POST /v1/principals with name and role; the answer is a typed Principal."""
    pid = uuid4()
    server.on(
        "POST",
        "/v1/principals",
        httpx.Response(201, json={"id": str(pid), "name": "c1", "role": "client", "token": "tok"}),
    )

    principal = await actor.create_principal("c1")

    assert (principal.id, principal.name, principal.role, principal.token) == (pid, "c1", "client", "tok")
    assert json.loads(server.requests[0].content) == {"name": "c1", "role": "client"}
    assert server.requests[0].headers["Authorization"] == "Bearer admin-token"
    assert str(server.requests[0].url) == "http://fedhub.test/v1/principals"


async def test_creating_is_not_retried_on_5xx(server: ScriptedServer, actor):
    """A 500 on a non-idempotent request may have acted: it is reported, not repeated."""
    server.on("POST", "/v1/principals", error_response(500, "Internal", "boom"))

    with pytest.raises(ServerUnreachable) as info:
        await actor.create_principal("c1")

    assert info.value.status_code == 500
    assert len(server.requests) == 1


async def test_creating_is_retried_after_429(server: ScriptedServer, actor):
    """429 means the server did nothing: safe to try again."""
    pid = uuid4()
    server.on(
        "POST",
        "/v1/principals",
        httpx.Response(429, headers={"Retry-After": "0"}),
        httpx.Response(201, json={"id": str(pid), "name": "a", "role": "actor", "token": "t"}),
    )

    principal = await actor.create_principal("a", role="actor")

    assert principal.role == "actor"
    assert len(server.requests) == 2


async def test_upload_model_sends_msgpack_tensors_and_name(server: ScriptedServer, actor):
    """The model goes up as a msgpack tensor map that decodes to the same state dict."""
    state = {"w": torch.randn(3, 2), "n": torch.tensor([5], dtype=torch.int64)}
    mid = uuid4()
    server.on(
        "POST",
        "/v1/models",
        httpx.Response(
            201,
            json={
                "id": str(mid),
                "name": "init",
                "digest": "sha256:ab",
                "size_bytes": 40,
                "spec": {"w": {"dtype": "float32", "shape": [3, 2]}},
                "training_id": None,
                "round": None,
                "created_at": "2025-01-01T00:00:00+00:00",
            },
        ),
    )

    info = await actor.upload_model(state, name="init")

    request = server.requests[0]
    assert request.headers["Content-Type"] == "application/msgpack"
    doc = decode_document(request.content)
    assert doc["name"] == "init"
    sent = records_to_state_dict(parse_tensor_map(doc["tensors"]))
    assert sent.keys() == state.keys()
    assert all(torch.equal(sent[k], state[k]) for k in state)
    assert (info.id, info.name, info.size_bytes, info.round) == (mid, "init", 40, None)
    assert info.created_at is not None


async def test_download_model_builds_torch_tensors(server: ScriptedServer, actor):
    """The weights come back as a state dict equal to what the server holds."""
    mid = uuid4()
    state = {"a": torch.arange(6, dtype=torch.float64).reshape(2, 3)}
    server.on("GET", f"/v1/models/{mid}/weights", weights_response(state))

    got = await actor.download_model(mid)

    assert torch.equal(got["a"], state["a"])
    assert server.requests[0].headers["Accept"] == "application/msgpack"


async def test_create_training_sends_options_and_leaves_out_unset_ones(server: ScriptedServer, actor):
    """Optional limits are only sent when given; clients and model ids go as strings."""
    clients = [uuid4(), uuid4()]
    server.on("POST", "/v1/trainings", httpx.Response(201, json={"id": str(T), "state": "INITIAL"}))
    server.on("POST", "/v1/trainings", httpx.Response(201, json={"id": str(T), "state": "INITIAL"}))

    await actor.create_training("m1", clients, rounds=3)
    await actor.create_training(
        "m1", clients, rounds=3, min_clients=1, round_timeout_s=30, skip_model_tests=True
    )

    first, second = (json.loads(r.content) for r in server.requests)
    assert first == {
        "model_id": "m1",
        "clients": [str(c) for c in clients],
        "aggregation": "fedavg",
        "rounds": 3,
        "skip_model_tests": False,
        "model_test_after_each_round": True,
        "delete_local_models_after_aggregation": True,
    }
    assert (second["min_clients"], second["round_timeout_s"], second["skip_model_tests"]) == (1, 30, True)
    assert not {"aggregation_params", "update_kind", "exclude_vars", "max_update_norm"} & second.keys()


async def test_create_training_sends_the_aggregation_options_when_given(server: ScriptedServer, actor):
    """Method parameters, update kind, excluded tensors and the norm bound go in the body."""
    server.on("POST", "/v1/trainings", httpx.Response(201, json={"id": str(T), "state": "INITIAL"}))
    await actor.create_training(
        "m1",
        [uuid4()],
        rounds=2,
        aggregation="fedadam",
        aggregation_params={"server_lr": 0.5},
        update_kind="delta",
        exclude_vars="^bn",
        max_update_norm=4.0,
    )
    body = json.loads(server.requests[0].content)
    assert body["aggregation"] == "fedadam"
    assert (
        body["aggregation_params"],
        body["update_kind"],
        body["exclude_vars"],
        body["max_update_norm"],
    ) == (
        {"server_lr": 0.5},
        "delta",
        "^bn",
        4.0,
    )


async def test_ensemble_members_are_listed_and_downloaded(server: ScriptedServer, actor):
    """get_members lists them; download_member asks for msgpack and builds a state dict."""
    mid = uuid4()
    member = {"w": torch.arange(3, dtype=torch.float32)}
    listing = [{"index": 0, "digest": "d", "size_bytes": 9, "update_id": None, "client_id": None}]
    server.on("GET", f"/v1/models/{mid}/members", httpx.Response(200, json=listing))
    server.on("GET", f"/v1/models/{mid}/members/0", weights_response(member))
    assert await actor.get_members(mid) == listing
    got = await actor.download_member(mid, 0)
    assert torch.equal(got["w"], member["w"])
    assert server.requests[1].headers["Accept"] == "application/msgpack"


async def test_training_reads_and_start(server: ScriptedServer, actor):
    """start, get and rounds hit their routes; a 409 on start is a ClientError."""
    server.on(
        "POST", f"/v1/trainings/{T}/start", httpx.Response(202, json={"id": str(T), "state": "INITIAL"})
    )
    server.on("POST", f"/v1/trainings/{T}/start", error_response(409, "IllegalTransition", "already started"))
    server.on("GET", f"/v1/trainings/{T}", httpx.Response(200, json={"id": str(T), "state": "ONGOING"}))
    server.on("GET", f"/v1/trainings/{T}/rounds", httpx.Response(200, json=[{"round": 1}]))

    assert (await actor.start_training(T))["state"] == "INITIAL"
    with pytest.raises(ClientError) as info:
        await actor.start_training(T)
    assert (await actor.get_training(T))["state"] == "ONGOING"
    assert await actor.get_rounds(T) == [{"round": 1}]
    assert (info.value.status_code, info.value.error) == (409, "IllegalTransition")


async def test_reads_are_retried_on_connection_errors_and_5xx(server: ScriptedServer, actor):
    """A GET survives a dropped connection and a 502."""

    def drop(request):
        raise httpx.ReadError("reset", request=request)

    server.on(
        "GET", f"/v1/trainings/{T}", drop, httpx.Response(502), httpx.Response(200, json={"id": str(T)})
    )

    assert (await actor.get_training(T))["id"] == str(T)
    assert len(server.requests) == 3


async def test_retries_stop_after_the_policy_attempts(server: ScriptedServer, actor):
    """Three 503s with a three-attempt policy: ServerUnreachable carrying the last status."""
    server.on("GET", f"/v1/trainings/{T}", *(error_response(503, "Unavailable", "x") for _ in range(3)))

    with pytest.raises(ServerUnreachable) as info:
        await actor.get_training(T)

    assert info.value.status_code == 503
    assert len(server.requests) == 3


async def test_validation_errors_without_an_error_name_are_still_readable(server: ScriptedServer, actor):
    """FastAPI's own 422 (`{"detail": [...]}`) becomes ClientError HTTP422 with the detail as text."""
    server.on(
        "GET", f"/v1/trainings/{T}", httpx.Response(422, json={"detail": [{"loc": ["path"], "msg": "bad"}]})
    )

    with pytest.raises(ClientError) as info:
        await actor.get_training(T)

    assert info.value.error == "HTTP422"
    assert "bad" in info.value.detail


async def test_events_yield_notifications_and_resume_from_an_id(server: ScriptedServer, actor):
    """Watching a training: filter and Last-Event-ID on the first connect, typed notifications out."""
    mid = uuid4()
    server.stream(
        b": keepalive\n\n",
        sse(11, "UPDATE_ROUND_START", T, round=2, global_model_uuid=mid),
        httpx.ReadError("reset"),
    )
    server.stream(sse(12, "TRAINING_FINISHED", T), Hang())

    async with contextlib.aclosing(actor.events(training_id=T, last_event_id=10)) as events:
        got = [await anext(events), await anext(events)]

    first, second = server.requests_to("GET", "/v1/events")
    assert (first.headers["Last-Event-ID"], first.url.params["training_id"]) == ("10", str(T))
    assert second.headers["Last-Event-ID"] == "11"
    assert [(n.seq, n.notification_type, n.round) for n in got] == [
        (11, "UPDATE_ROUND_START", 2),
        (12, "TRAINING_FINISHED", None),
    ]
    assert got[0].global_model_id == mid
    assert got[0].training_id == T
    assert isinstance(got[0].event_id, UUID)
    assert got[0].timestamp is not None


def test_retry_delays_grow_and_stay_under_the_cap():
    """Delays lie in [ceiling/2, ceiling] with ceiling = min(cap, base * 2**n)."""
    policy = RetryPolicy(attempts=5, base=0.5, cap=3.0)
    for n, ceiling in enumerate([0.5, 1.0, 2.0, 3.0, 3.0, 3.0]):
        for _ in range(20):
            assert ceiling / 2 <= policy.delay(n) <= ceiling
    assert policy.delay(10_000) <= 3.0


def test_retry_policy_rejects_nonsense():
    """Zero attempts or negative times are configuration errors."""
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="non-negative"):
        RetryPolicy(base=-1)
