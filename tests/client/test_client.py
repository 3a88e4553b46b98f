"""`Client`'s protocol against a scripted server: requests in order, retries, skips and reconnects."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import threading
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import httpx
import pytest
import torch

from fedhub.client import Client, ClientError, RetryPolicy, ServerUnreachable
from fedhub.client import transport as transport_module
from fedhub.client.transport import Transport, shared_tls
from shared.codec import decode_document, encode_tensors, parse_tensor_map
from shared.tensors import records_to_state_dict, state_dict_to_records

from .fakes import FAST, Hang, ScriptedServer, closed_port, error_response, session_to, sse, weights_response

BASE = "http://fedhub.test"
TOKEN = "client-token"
T = UUID("00000000-0000-0000-0000-00000000000a")
ME = UUID("00000000-0000-0000-0000-0000000000c1")
OTHER = UUID("00000000-0000-0000-0000-0000000000c2")
M0, M1, M2 = (UUID(int=i) for i in (0x100, 0x101, 0x102))
MODELS = {
    m: {"w": torch.full((2, 3), float(i)), "b": torch.arange(3, dtype=torch.float32)}
    for i, m in enumerate((M0, M1, M2))
}

UPDATES = f"/v1/trainings/{T}/updates"
TEST_METRICS = f"/v1/trainings/{T}/test-metrics"
TRAINING = f"/v1/trainings/{T}"


def training(
    state: str, phase: str | None = None, round_: int = 0, model: UUID = M0, **extra: Any
) -> httpx.Response:
    """`GET /v1/trainings/{id}` answering the given state."""
    body = {
        "id": str(T),
        "state": state,
        "phase": phase,
        "round": round_,
        "rounds": 2,
        "current_model_id": str(model),
        "participants": [str(ME), str(OTHER)],
        "uploaded": [],
        "tested": [],
    }
    body.update({k: [str(v) for v in vs] if isinstance(vs, list) else vs for k, vs in extra.items()})
    return httpx.Response(200, json=body)


def created(round_: int) -> httpx.Response:
    """An accepted update."""
    return httpx.Response(201, json={"update_id": str(uuid4()), "round": round_, "duplicate": False})


def metrics_created(round_: int) -> httpx.Response:
    """Accepted test metrics."""
    return httpx.Response(201, json={"round": round_, "duplicate": False})


class Recorder:
    """fit / evaluate / on_event fakes that remember how they were called."""

    def __init__(self) -> None:
        self.fits: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
        self.evaluations: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    def fit(self, weights, config):
        """New weights = old + round; 7 examples."""
        self.fits.append(({k: v.clone() for k, v in weights.items()}, config))
        # Changing the given tensors in place must not leak into the SDK's model cache.
        for v in weights.values():
            v.add_(1000)
        return {k: v - 1000 + config["round"] for k, v in weights.items()}, 7, {"loss": 0.25}

    def evaluate(self, weights, config):
        """3 examples, accuracy 0.5."""
        self.evaluations.append(({k: v.clone() for k, v in weights.items()}, config))
        return 3, {"accuracy": 0.5}

    def on_event(self, kind, details):
        """Remember a hook call."""
        self.events.append((kind, details))


def make_client(
    http: aiohttp.ClientSession, rec: Recorder, training_id: UUID | None = T, **kwargs: Any
) -> Client:
    """A client over the scripted server with instant retries."""
    kwargs.setdefault("evaluate", rec.evaluate)
    return Client(
        BASE,
        TOKEN,
        fit=rec.fit,
        training_id=training_id,
        http=http,
        retry=FAST,
        name="c1",
        on_event=rec.on_event,
        **kwargs,
    )


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal names and values."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def decode_update(request: httpx.Request) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An upload's msgpack document and its tensors."""
    assert request.headers["Content-Type"] == "application/msgpack"
    doc = decode_document(request.content)
    return doc, records_to_state_dict(parse_tensor_map(doc["tensors"]))


async def test_two_rounds_follow_the_protocol_in_order(server: ScriptedServer, http):
    """Train, test, train, test, finish: exactly these requests, each model downloaded once."""
    server.stream(
        sse(1, "TRAINING_START", T),
        sse(2, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(3, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M1)
        + sse(4, "UPDATE_ROUND_START", T, round=2, global_model_uuid=M1),
        sse(5, "MODEL_TEST_ROUND", T, round=2, global_model_uuid=M2),
        sse(6, "TRAINING_FINISHED", T, round=2, global_model_uuid=M2),
        Hang(),
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=2, model=M2))
    for m in (M0, M1, M2):
        server.on("GET", f"/v1/models/{m}/weights", weights_response(MODELS[m]))
    server.on("POST", UPDATES, created(1), created(2))
    server.on("POST", TEST_METRICS, metrics_created(1), metrics_created(2))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert server.calls == [
        "GET /v1/events",
        f"GET {TRAINING}",
        f"GET /v1/models/{M0}/weights",
        f"POST {UPDATES}",
        f"GET /v1/models/{M1}/weights",
        f"POST {TEST_METRICS}",
        f"POST {UPDATES}",
        f"GET /v1/models/{M2}/weights",
        f"POST {TEST_METRICS}",
        f"GET {TRAINING}",
    ]
    assert server.unused() == {}
    events_request = server.requests[0]
    assert events_request.url.params["training_id"] == str(T)
    assert "Last-Event-ID" not in events_request.headers
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in server.requests)

    assert [config for _, config in rec.fits] == [
        {"training_id": str(T), "round": 1, "global_model_id": str(M0)},
        {"training_id": str(T), "round": 2, "global_model_id": str(M1)},
    ]
    assert_same_state(rec.fits[0][0], MODELS[M0])
    assert_same_state(rec.fits[1][0], MODELS[M1])
    assert_same_state(rec.evaluations[0][0], MODELS[M1])

    for round_, request in enumerate(server.requests_to("POST", UPDATES), start=1):
        doc, tensors = decode_update(request)
        assert (doc["round"], doc["num_examples"], doc["metrics"]) == (round_, 7, {"loss": 0.25})
        start = MODELS[M0] if round_ == 1 else MODELS[M1]
        assert_same_state(tensors, {k: v + round_ for k, v in start.items()})
    assert [json.loads(r.content) for r in server.requests_to("POST", TEST_METRICS)] == [
        {"round": 1, "num_examples": 3, "metrics": {"accuracy": 0.5}},
        {"round": 2, "num_examples": 3, "metrics": {"accuracy": 0.5}},
    ]

    assert (result.training_id, result.state, result.final_model_id) == (T, "COMPLETED", M2)
    assert (result.rounds_trained, result.rounds_tested) == ((1, 2), (1, 2))
    assert [kind for kind, _ in rec.events] == ["uploaded", "tested", "uploaded", "tested", "finished"]
    assert rec.events[0][1]["round"] == 1
    assert rec.events[0][1]["client"] == "c1"
    assert rec.events[-1][1]["final_model_id"] == str(M2)


async def test_without_a_training_id_it_follows_the_first_training_heard_of(server: ScriptedServer, http):
    """No state check before the first notification; other trainings' notifications are ignored."""
    elsewhere = uuid4()
    server.stream(
        sse(1, "TRAINING_START", T),
        sse(2, "UPDATE_ROUND_START", elsewhere, round=1, global_model_uuid=M2),
        sse(3, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(4, "TRAINING_FINISHED", elsewhere),
        sse(5, "TRAINING_FINISHED", T, round=1, global_model_uuid=M1),
        Hang(),
    )
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("POST", UPDATES, created(1))
    server.on("GET", TRAINING, training("COMPLETED", round_=1, model=M1))
    rec = Recorder()

    result = await make_client(http, rec, training_id=None).run()

    assert server.calls == [
        "GET /v1/events",
        f"GET /v1/models/{M0}/weights",
        f"POST {UPDATES}",
        f"GET {TRAINING}",
    ]
    assert "training_id" not in server.requests[0].url.params
    assert (result.training_id, result.rounds_trained, result.final_model_id) == (T, (1,), M1)


async def test_round_closed_upload_is_skipped_and_the_training_goes_on(server: ScriptedServer, http):
    """A 409 RoundClosed means the notification was stale: no retry, no error, next round trained."""
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(2, "UPDATE_ROUND_START", T, round=2, global_model_uuid=M1),
        sse(3, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=2, model=M2))
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("GET", f"/v1/models/{M1}/weights", weights_response(MODELS[M1]))
    server.on("POST", UPDATES, error_response(409, "RoundClosed", "round 1 of training closed"), created(2))
    rec = Recorder()

    result = await make_client(http, rec).run()

    uploads = server.requests_to("POST", UPDATES)
    assert [decode_update(r)[0]["round"] for r in uploads] == [1, 2]
    assert result.rounds_trained == (2,)
    assert [(kind, d.get("round")) for kind, d in rec.events] == [("uploaded", 2), ("finished", None)]


async def test_a_503_upload_is_retried_until_accepted(server: ScriptedServer, http):
    """5xx is transient: the same body is sent again and the second answer counts."""
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(2, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on(
        "GET", TRAINING, training("ONGOING", "COLLECTING", 1, uploaded=[]), training("COMPLETED", round_=1)
    )
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("POST", UPDATES, error_response(503, "Unavailable", "try later"), created(1))
    rec = Recorder()

    result = await make_client(http, rec).run()

    first, second = server.requests_to("POST", UPDATES)
    assert first.content == second.content
    assert len(rec.fits) == 1
    assert result.rounds_trained == (1,)


async def test_a_dropped_stream_reconnects_with_last_event_id(server: ScriptedServer, http):
    """After a read error the stream reopens with `Last-Event-ID` and the state is checked again."""
    server.stream(
        sse(1, "TRAINING_START", T),
        sse(2, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        httpx.ReadError("connection reset by peer"),
    )
    server.stream(
        sse(3, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M1),
        sse(4, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on(
        "GET",
        TRAINING,
        training("INITIAL"),
        training("ONGOING", "AGGREGATING", 1, uploaded=[ME]),
        training("COMPLETED", round_=1, model=M1),
    )
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("GET", f"/v1/models/{M1}/weights", weights_response(MODELS[M1]))
    server.on("POST", UPDATES, created(1))
    server.on("POST", TEST_METRICS, metrics_created(1))
    rec = Recorder()

    result = await make_client(http, rec).run()

    connects = server.requests_to("GET", "/v1/events")
    assert len(connects) == 2
    assert "Last-Event-ID" not in connects[0].headers
    assert connects[1].headers["Last-Event-ID"] == "2"
    assert server.calls.index(f"GET {TRAINING}", 2) > server.calls.index("GET /v1/events", 1)
    assert (result.rounds_trained, result.rounds_tested) == ((1,), (1,))
    assert server.unused() == {}


async def test_a_cleanly_ended_stream_reconnects_too(server: ScriptedServer, http):
    """A server that closes the stream (a restart, a proxy) is reconnected, with the last id seen."""
    server.stream(sse(8, "TRAINING_START", T))
    server.stream(sse(9, "TRAINING_FINISHED", T), Hang())
    server.on("GET", TRAINING, training("INITIAL"), training("INITIAL"), training("COMPLETED"))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert server.requests_to("GET", "/v1/events")[1].headers["Last-Event-ID"] == "8"
    assert result.state == "COMPLETED"


async def test_catch_up_after_reconnect_tests_once_even_when_the_replay_repeats_it(
    server: ScriptedServer, http
):
    """State says TESTING on reconnect: test now; the replayed MODEL_TEST_ROUND is then skipped."""
    server.stream(
        sse(2, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0), httpx.RemoteProtocolError("gone")
    )
    server.stream(
        sse(3, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M1),
        sse(4, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(5, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on(
        "GET",
        TRAINING,
        training("INITIAL"),
        training("ONGOING", "TESTING", 1, model=M1, uploaded=[ME, OTHER]),
        training("COMPLETED", round_=1, model=M1),
    )
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("GET", f"/v1/models/{M1}/weights", weights_response(MODELS[M1]))
    server.on("POST", UPDATES, created(1))
    server.on("POST", TEST_METRICS, metrics_created(1))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert server.calls[-5:] == [
        "GET /v1/events",
        f"GET {TRAINING}",
        f"GET /v1/models/{M1}/weights",
        f"POST {TEST_METRICS}",
        f"GET {TRAINING}",
    ]
    assert (len(rec.fits), len(rec.evaluations)) == (1, 1)
    assert (result.rounds_trained, result.rounds_tested) == ((1,), (1,))


async def test_a_late_joiner_trains_the_open_round_and_skips_stale_notifications(
    server: ScriptedServer, http
):
    """Joining during round 2: train it from the state; replayed round 1 and 2 starts do nothing."""
    server.stream(
        sse(7, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(8, "UPDATE_ROUND_START", T, round=2, global_model_uuid=M1),
        sse(9, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on(
        "GET",
        TRAINING,
        training("ONGOING", "COLLECTING", 2, model=M1, uploaded=[OTHER]),
        training("COMPLETED", round_=2, model=M2),
    )
    server.on("GET", "/v1/me", httpx.Response(200, json={"id": str(ME), "name": "c1", "role": "client"}))
    server.on("GET", f"/v1/models/{M1}/weights", weights_response(MODELS[M1]))
    server.on("POST", UPDATES, created(2))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert server.calls == [
        "GET /v1/events",
        f"GET {TRAINING}",
        "GET /v1/me",
        f"GET /v1/models/{M1}/weights",
        f"POST {UPDATES}",
        f"GET {TRAINING}",
    ]
    assert result.rounds_trained == (2,)


async def test_a_client_that_already_uploaded_waits_for_the_next_round(server: ScriptedServer, http):
    """A restart after uploading: the state lists this client, so the round is not trained again."""
    server.stream(
        sse(5, "UPDATE_ROUND_START", T, round=3, global_model_uuid=M2), sse(6, "TRAINING_FINISHED", T), Hang()
    )
    server.on(
        "GET",
        TRAINING,
        training("ONGOING", "COLLECTING", 3, model=M2, uploaded=[ME]),
        training("COMPLETED", round_=3),
    )
    server.on("GET", "/v1/me", httpx.Response(200, json={"id": str(ME), "name": "c1", "role": "client"}))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert rec.fits == []
    assert result.rounds_trained == ()


async def test_a_completed_training_returns_at_once(server: ScriptedServer, http):
    """Nothing to do for a training that is over: no download, no fit."""
    server.stream(Hang())
    server.on("GET", TRAINING, training("COMPLETED", round_=2, model=M2))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert server.calls == ["GET /v1/events", f"GET {TRAINING}"]
    assert (result.state, result.final_model_id, result.rounds_trained) == ("COMPLETED", M2, ())
    assert rec.events[-1][0] == "finished"


async def test_without_evaluate_test_rounds_are_skipped(server: ScriptedServer, http):
    """No evaluate function: nothing downloaded or sent for a test round."""
    server.stream(
        sse(1, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M1), sse(2, "TRAINING_FINISHED", T), Hang()
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=1, model=M1))
    rec = Recorder()

    result = await make_client(http, rec, evaluate=None).run()

    assert server.calls == ["GET /v1/events", f"GET {TRAINING}", f"GET {TRAINING}"]
    assert result.rounds_tested == ()


async def test_other_4xx_raise_client_error_with_the_servers_words(server: ScriptedServer, http):
    """A refused update (422) is not retried and surfaces as ClientError(error, detail)."""
    server.stream(sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0), Hang())
    server.on("GET", TRAINING, training("INITIAL"))
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("POST", UPDATES, error_response(422, "TensorSpecMismatch", "tensor 'w': shape [2, 3]"))
    rec = Recorder()

    with pytest.raises(ClientError) as info:
        await make_client(http, rec).run()

    assert (info.value.status_code, info.value.error, info.value.detail) == (
        422,
        "TensorSpecMismatch",
        "tensor 'w': shape [2, 3]",
    )
    assert len(server.requests_to("POST", UPDATES)) == 1


async def test_an_unauthorised_event_stream_fails_at_once(server: ScriptedServer, http):
    """401 on connect is final: one attempt, ClientError Unauthenticated."""
    server.stream(error_response(401, "Unauthenticated", "bad token"))

    with pytest.raises(ClientError) as info:
        await make_client(http, Recorder()).run()

    assert info.value.error == "Unauthenticated"
    assert server.calls == ["GET /v1/events"]


async def test_an_unreachable_server_gives_up_after_the_policy_attempts():
    """Connection errors are retried `attempts` times, then ServerUnreachable."""
    tries = []

    async def count(session: object, context: object, params: aiohttp.TraceRequestStartParams) -> None:
        tries.append(params.url)

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(count)
    async with session_to(closed_port(), trace_configs=[trace]) as http:
        client = Client(BASE, TOKEN, fit=Recorder().fit, training_id=T, http=http, retry=RetryPolicy(4, 0, 0))
        with pytest.raises(ServerUnreachable) as info:
            await client.run()

    assert len(tries) == 4
    assert "ClientConnectorError" in info.value.detail


async def test_a_failing_hook_does_not_stop_the_client(server: ScriptedServer, http):
    """on_event errors are logged and the training goes on."""
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0), sse(2, "TRAINING_FINISHED", T), Hang()
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=1))
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("POST", UPDATES, created(1))

    def broken(kind, details):
        raise RuntimeError("ui crashed")

    rec = Recorder()
    client = Client(BASE, TOKEN, fit=rec.fit, training_id=T, http=http, retry=FAST, on_event=broken)
    result = await client.run()

    assert result.rounds_trained == (1,)


async def test_malformed_event_data_is_ignored(server: ScriptedServer, http):
    """An event whose data is not a notification is logged and skipped."""
    server.stream(
        b"data: not json\n\n", b'data: {"no": "training"}\n\n', sse(3, "TRAINING_FINISHED", T), Hang()
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED"))

    result = await make_client(http, Recorder()).run()

    assert result.state == "COMPLETED"


def test_run_sync_runs_the_client_in_its_own_loop(server: ScriptedServer, monkeypatch):
    """The blocking wrapper makes its own loop and HTTP client and returns `run()`'s result."""
    server.stream(Hang())
    server.on("GET", TRAINING, training("COMPLETED", round_=2, model=M2))
    # The client makes its HTTP session inside the new loop; route that one to the scripted server.
    monkeypatch.setattr(transport_module, "new_session", server.session)

    result = Client(BASE, TOKEN, fit=Recorder().fit, training_id=T, retry=FAST).run_sync()

    assert result.final_model_id == M2
    assert server.calls == ["GET /v1/events", f"GET {TRAINING}"]


async def test_client_config_shapes_fit_config_and_the_upload(server: ScriptedServer, http):
    """A round's client_config: fit gets mu; the upload is new - global without the excluded tensors."""
    base = {
        "w": torch.full((2, 3), 2.0),
        "b": torch.arange(3, dtype=torch.float32),
        "steps": torch.tensor([5], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    config = {"update_kind": "delta", "exclude_vars": "^b$", "mu": 0.5}
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0, client_config=config),
        sse(2, "TRAINING_FINISHED", T, round=1, global_model_uuid=M1),
        Hang(),
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=1, model=M1))
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(base))
    server.on("POST", UPDATES, created(1))
    seen: list[dict[str, Any]] = []

    def fit(weights, cfg):
        seen.append(cfg)
        new = {k: v.clone() for k, v in weights.items()}
        new["w"] += 0.25
        new["b"] += 100
        new["steps"] += 3
        new["mask"] = torch.tensor([False, False])
        return new, 4, {}

    client = Client(BASE, TOKEN, fit=fit, training_id=T, http=http, retry=FAST)
    await client.run()

    assert seen == [{"training_id": str(T), "round": 1, "global_model_id": str(M0), **config}]
    (request,) = server.requests_to("POST", UPDATES)
    _, sent = decode_update(request)
    assert list(sent) == ["w", "steps", "mask"]
    assert torch.equal(sent["w"], torch.full((2, 3), 0.25))
    assert torch.equal(sent["steps"], torch.tensor([3]))
    assert torch.equal(sent["mask"], torch.tensor([True, False]))


async def test_catching_up_learns_the_client_config_from_the_training(server: ScriptedServer, http):
    """A client joining mid-round reads client_config from the training's JSON and uses it."""
    server.stream(sse(1, "TRAINING_FINISHED", T, round=1, global_model_uuid=M1), Hang())
    server.on(
        "GET",
        TRAINING,
        training("ONGOING", "COLLECTING", 1, client_config={"update_kind": "weights", "exclude_vars": "^w$"}),
        training("COMPLETED", round_=1, model=M1),
    )
    server.on("GET", f"/v1/models/{M0}/weights", weights_response(MODELS[M0]))
    server.on("POST", UPDATES, created(1))
    rec = Recorder()

    await make_client(http, rec).run()

    assert rec.fits[0][1]["exclude_vars"] == "^w$"
    (request,) = server.requests_to("POST", UPDATES)
    _, sent = decode_update(request)
    assert list(sent) == ["b"]
    assert torch.equal(sent["b"], MODELS[M0]["b"] + 1)


def inline(state: dict[str, torch.Tensor], *, sha256: str | None = None) -> dict[str, str]:
    """A round notification's `global_model` entry for `state` (a wrong `sha256` if given)."""
    data = encode_tensors(state_dict_to_records(state))
    return {
        "media_type": "application/msgpack",
        "sha256": sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
        "base64": base64.b64encode(data).decode(),
    }


async def test_a_model_that_comes_inline_is_not_downloaded(server: ScriptedServer, http):
    """Round 1 carries its model: no download, fit gets those weights, and the test round of the
    same model reuses it. Round 2's inline model does not match its digest: downloaded instead."""
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0, global_model=inline(MODELS[M0])),
        sse(2, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M0, global_model=inline(MODELS[M0])),
        sse(
            3,
            "UPDATE_ROUND_START",
            T,
            round=2,
            global_model_uuid=M1,
            global_model=inline(MODELS[M1], sha256="0" * 64),
        ),
        sse(4, "TRAINING_FINISHED", T),
        Hang(),
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=2, model=M2))
    server.on("GET", f"/v1/models/{M1}/weights", weights_response(MODELS[M1]))
    server.on("POST", UPDATES, created(1), created(2))
    server.on("POST", TEST_METRICS, metrics_created(1))
    rec = Recorder()

    result = await make_client(http, rec).run()

    assert result.rounds_trained == (1, 2)
    assert not server.requests_to("GET", f"/v1/models/{M0}/weights")
    assert len(server.requests_to("GET", f"/v1/models/{M1}/weights")) == 1
    assert_same_state(rec.fits[0][0], MODELS[M0])
    assert_same_state(rec.evaluations[0][0], MODELS[M0])
    assert_same_state(rec.fits[1][0], MODELS[M1])
    assert server.unused() == {}


async def test_clients_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session the SDK makes verifies with the same TLS context, made once per process (building
    one loads the CA certificates: ~40 ms each, 40 s for 1,000 simulated clients)."""
    verify: list[object] = []
    real = aiohttp.TCPConnector

    def recording(**kwargs: Any) -> aiohttp.TCPConnector:
        verify.append(kwargs.get("ssl"))
        return real(**kwargs)

    monkeypatch.setattr(aiohttp, "TCPConnector", recording)
    for transport in (Transport("https://a.example", "t"), Transport("https://b.example", "u")):
        assert not transport.http.closed
        await transport.aclose()
    assert len(verify) == 2
    assert verify[0] is verify[1] is shared_tls()
    assert isinstance(verify[0], ssl.SSLContext)
    assert verify[0].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_async_callbacks_run_on_the_loop_plain_ones_in_a_thread(
    server: ScriptedServer, http, kind: str
) -> None:
    """An `async def` fit / evaluate is awaited on the client's event loop (no thread hop), a plain
    one runs in a worker thread; either way the round's upload and test report are the same."""
    server.stream(
        sse(1, "UPDATE_ROUND_START", T, round=1, global_model_uuid=M0),
        sse(2, "MODEL_TEST_ROUND", T, round=1, global_model_uuid=M1),
        sse(3, "TRAINING_FINISHED", T, round=1, global_model_uuid=M1),
        Hang(),
    )
    server.on("GET", TRAINING, training("INITIAL"), training("COMPLETED", round_=1, model=M1))
    for m in (M0, M1):
        server.on("GET", f"/v1/models/{m}/weights", weights_response(MODELS[m]))
    server.on("POST", UPDATES, created(1))
    server.on("POST", TEST_METRICS, metrics_created(1))
    rec, threads = Recorder(), []

    if kind == "async":

        async def fit(weights, config):
            threads.append(threading.get_ident())
            return rec.fit(weights, config)

        async def evaluate(weights, config):
            threads.append(threading.get_ident())
            return rec.evaluate(weights, config)
    else:

        def fit(weights, config):
            threads.append(threading.get_ident())
            return rec.fit(weights, config)

        def evaluate(weights, config):
            threads.append(threading.get_ident())
            return rec.evaluate(weights, config)

    client = Client(BASE, TOKEN, fit=fit, evaluate=evaluate, training_id=T, http=http, retry=FAST, name="c1")
    result = await client.run()

    loop_thread = threading.get_ident()
    assert len(threads) == 2
    assert all((t == loop_thread) is (kind == "async") for t in threads)
    (upload,) = server.requests_to("POST", UPDATES)
    doc, tensors = decode_update(upload)
    assert (doc["round"], doc["num_examples"], doc["metrics"]) == (1, 7, {"loss": 0.25})
    assert_same_state(tensors, {k: v + 1 for k, v in MODELS[M0].items()})
    (report,) = server.requests_to("POST", TEST_METRICS)
    assert json.loads(report.content) == {"round": 1, "num_examples": 3, "metrics": {"accuracy": 0.5}}
    assert (result.rounds_trained, result.rounds_tested) == ((1,), (1,))
