"""The report routes' short lane (`services.api.lane`): the same answers as the full stack, the
same gate, the same metrics, and nothing else taken by it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.requests import Request as StarletteRequest
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.api import service as api_service
from services.api.lane import Api
from services.api.main import create_app
from shared.codec import packb
from shared.errors import NotFound
from shared.http_metrics import HTTP_REQUEST_SECONDS
from shared.runtime import Runtime
from tests.api.conftest import World, api_settings
from tests.api.helpers import ADMIN_TOKEN, MSGPACK, bearer, model_tensors, msgpack_body

UPDATES = "/v1/trainings/{training_id}/updates"
TESTS = "/v1/trainings/{training_id}/test-metrics"


class StackCalls:
    """Wraps the app's built middleware stack, counting the requests that went through it."""

    def __init__(self, app: Api) -> None:
        assert app.middleware_stack is not None, "the stack is built by the first request through it"
        self.inner: ASGIApp = app.middleware_stack
        self.paths: list[str] = []
        app.middleware_stack = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
        await self.inner(scope, receive, send)


def _app(world: World) -> Api:
    transport = world.fedhub.http._transport
    assert isinstance(transport, httpx.ASGITransport)
    app = transport.app
    assert isinstance(app, Api)
    return app


async def test_reports_take_the_lane_everything_else_the_stack(world: World) -> None:
    """An upload and a test report never enter the middleware stack; a read, and a report route
    with the wrong method (405 from the router), do."""
    app = _app(world)
    assert app.lane is not None
    stack = StackCalls(app)
    http, alice = world.fedhub.http, world.alice
    upload = await http.post(
        UPDATES.format(training_id=world.training_id),
        content=msgpack_body(model_tensors(), round=1, num_examples=3),
        headers={**alice.headers, "Content-Type": MSGPACK},
    )
    assert upload.status_code == 201, upload.text
    report = await http.post(
        TESTS.format(training_id=world.training_id),
        json={"round": 1, "num_examples": 3, "metrics": {"accuracy": 0.5}},
        headers=alice.headers,
    )
    assert report.status_code == 409  # the round collects updates: reached the service, refused
    assert stack.paths == []
    read = await http.get(f"/v1/trainings/{world.training_id}", headers=alice.headers)
    assert read.status_code == 200
    wrong = await http.put(UPDATES.format(training_id=world.training_id), headers=alice.headers)
    assert wrong.status_code == 405
    assert stack.paths == [
        f"GET /v1/trainings/{world.training_id}",
        f"PUT {UPDATES.format(training_id=world.training_id)}",
    ]


Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def _refusals(world: World) -> dict[str, Request]:
    """Requests the report routes refuse, each for a reason of its own."""
    tid, alice, bob = world.training_id, world.alice, world.bob
    body = msgpack_body(model_tensors(), round=1, num_examples=3)
    up = UPDATES.format(training_id=tid)

    def post(path: str, content: bytes, headers: dict[str, str]) -> Request:
        return lambda http: http.post(path, content=content, headers=headers)

    return {
        "no token": post(up, body, {"Content-Type": MSGPACK}),
        "bad token": post(up, body, {"Authorization": "Bearer nope", "Content-Type": MSGPACK}),
        "an actor": post(up, body, {**world.fedhub.admin.headers, "Content-Type": MSGPACK}),
        "an outsider": post(up, body, {**world.outsider.headers, "Content-Type": MSGPACK}),
        "malformed id": post(
            UPDATES.format(training_id="nope"), body, {**alice.headers, "Content-Type": MSGPACK}
        ),
        "unknown training": post(
            UPDATES.format(training_id="7b0c2f5e-1111-4222-8333-944455556666"),
            body,
            {**alice.headers, "Content-Type": MSGPACK},
        ),
        "media type": post(up, body, {**alice.headers, "Content-Type": "text/plain"}),
        "wrong round": post(
            up,
            msgpack_body(model_tensors(), round=7, num_examples=3),
            {**bob.headers, "Content-Type": MSGPACK},
        ),
        "bad shape": post(
            up,
            msgpack_body({**model_tensors(), "w": model_tensors()["b"]}, round=1, num_examples=3),
            {**bob.headers, "Content-Type": MSGPACK},
        ),
        "not msgpack": post(up, b"\xc1\xc1", {**bob.headers, "Content-Type": MSGPACK}),
        "no tensors": post(
            up, packb({"round": 1, "num_examples": 3}), {**bob.headers, "Content-Type": MSGPACK}
        ),
        "test report too early": post(
            TESTS.format(training_id=tid), b'{"round": 1, "num_examples": 1, "metrics": {}}', alice.headers
        ),
        "test report not json": post(TESTS.format(training_id=tid), b"{", alice.headers),
    }


def _answer(resp: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    return (
        resp.status_code,
        resp.json(),
        resp.headers.get("content-type"),
        resp.headers.get("www-authenticate"),
    )


async def test_the_lane_answers_every_refusal_as_the_stack_does(world: World) -> None:
    """The same status, body and headers through the lane and through the full stack (lane off),
    for refusals from the caller check to the body's content; a repeat upload answers the same too."""
    app = _app(world)
    lane = app.lane
    http = world.fedhub.http
    seen: dict[str, tuple[int, Any, str | None, str | None]] = {}
    for name, request in _refusals(world).items():
        through_lane = _answer(await request(http))
        app.lane = None
        try:
            through_stack = _answer(await request(http))
        finally:
            app.lane = lane
        assert through_lane == through_stack, name
        assert 400 <= through_lane[0] < 500, (name, through_lane)
        seen[name] = through_lane
    details = {answer[1]["detail"] for answer in seen.values()}
    assert len(details) == len(seen), "each refusal names its own problem"
    assert seen["no token"][3] == "Bearer"
    assert seen["malformed id"][0] == 422

    body = msgpack_body(model_tensors(), round=1, num_examples=3)
    headers = {**world.alice.headers, "Content-Type": MSGPACK}
    first = await http.post(UPDATES.format(training_id=world.training_id), content=body, headers=headers)
    assert first.status_code == 201
    repeat_lane = await http.post(
        UPDATES.format(training_id=world.training_id), content=body, headers=headers
    )
    app.lane = None
    try:
        repeat_stack = await http.post(
            UPDATES.format(training_id=world.training_id), content=body, headers=headers
        )
    finally:
        app.lane = lane
    assert _answer(repeat_lane) == _answer(repeat_stack)
    assert repeat_lane.status_code == 200
    assert repeat_lane.json()["update_id"] == first.json()["update_id"]


async def test_an_unexpected_error_is_a_500_and_raised_for_the_server(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error no handler takes: a plain 500 goes out and the error reaches the server (which logs
    it), as through Starlette's stack; the request's metrics say 500 under the route's template."""

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(api_service, "receive_test_metrics", broken)
    app = _app(world)
    path = TESTS.format(training_id=world.training_id)
    before = HTTP_REQUEST_SECONDS.count(app="api", method="POST", route=TESTS, status=500)
    report = {"round": 1, "num_examples": 1, "metrics": {}}
    with pytest.raises(RuntimeError, match="on fire"):
        await world.fedhub.http.post(path, json=report, headers=world.alice.headers)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://fedhub.test") as quiet:
        resp = await quiet.post(path, json=report, headers=world.alice.headers)
    assert (resp.status_code, resp.text) == (500, "Internal Server Error")
    assert HTTP_REQUEST_SECONDS.count(app="api", method="POST", route=TESTS, status=500) == before + 2


async def test_lane_requests_take_the_gates_slots_with_the_stacks(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one request slot, a report waits while a request through the stack holds it, and is
    answered once that one ends."""
    app = create_app(api_settings(runtime, max_concurrent_requests=1), runtime)
    assert app.lane is not None
    inside, release = asyncio.Event(), asyncio.Event()

    async def held_view(*args: object, **kwargs: object) -> None:
        inside.set()
        await release.wait()
        raise NotFound("released")

    monkeypatch.setattr(api_service, "visible_training", held_view)
    tid = "7b0c2f5e-1111-4222-8333-944455556666"
    admin = bearer(ADMIN_TOKEN)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fedhub.test") as http,
    ):
        held = asyncio.create_task(http.get(f"/v1/trainings/{tid}", headers=admin))
        await asyncio.wait_for(inside.wait(), timeout=5)
        waiting = asyncio.create_task(
            http.post(TESTS.format(training_id=tid), json={"round": 1}, headers=admin)
        )
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the report waits for the one slot"
        release.set()
        assert (await held).status_code == 404
        answer = await asyncio.wait_for(waiting, timeout=5)
    assert answer.status_code == 403  # an actor's report: refused once its turn came


def _plain_500(request: StarletteRequest, exc: Exception) -> Response:
    return PlainTextResponse("down", status_code=500)


@pytest.mark.parametrize("why", ["debug", "a 500 handler", "an Exception handler"])
def test_the_lane_stays_off_where_only_the_stack_applies(why: str) -> None:
    """Debug answers, an app's own 500 handler: the stack alone applies them, so no lane."""
    assert Api().lane_allowed()
    app = Api(debug=why == "debug")
    if why != "debug":
        app.add_exception_handler(500 if why == "a 500 handler" else Exception, _plain_500)
    assert not app.lane_allowed()


async def test_the_servers_scope_keeps_nothing_the_stack_added(world: World) -> None:
    """A server keeps a kept-alive connection's last scope until its next request: after a request
    through the stack and one through the lane, the scope it passed holds only what it put there."""
    app = _app(world)
    upload = msgpack_body(model_tensors(), round=1, num_examples=3)
    for method, path, body, status in (
        ("GET", f"/v1/trainings/{world.training_id}", b"", 200),
        ("POST", UPDATES.format(training_id=world.training_id), upload, 201),
    ):
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"test"),
                (b"authorization", f"Bearer {world.alice.token}".encode()),
                (b"content-type", MSGPACK.encode()),
            ],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        passed = dict(scope)
        sent: list[dict[str, Any]] = []

        async def receive(body: bytes = body) -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)  # noqa: B023 - awaited within the iteration

        await app(scope, receive, send)
        assert (sent[0]["type"], sent[0]["status"]) == ("http.response.start", status), sent
        assert scope == passed, path


@pytest.mark.parametrize(
    ("method", "path", "report"),
    [
        ("POST", "/v1/trainings/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/updates", True),
        ("POST", "/v1/trainings/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/test-metrics", True),
        ("POST", "/v1/trainings/not-a-uuid/updates", True),  # its 422 is the route's to give
        ("GET", "/v1/trainings/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/updates", False),
        ("GET", "/v1/trainings/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11", False),
        ("POST", "/v1/trainings/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/start", False),
        ("POST", "/v1/principals", False),
        ("GET", "/v1/models/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/weights", True),
        ("GET", "/v1/models/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11/members/2", True),
        ("GET", "/v1/models/0b7c1a52-56f3-4f57-9a55-1b1d3a3b8d11", False),
        ("POST", "/v1/models", False),
    ],
)
async def test_the_socket_gate_tells_round_requests_by_their_routes(
    runtime: Runtime, method: str, path: str, report: bool
) -> None:
    """`Api.is_round_request` (the socket gate's question, `services/api/connections.py`) is true
    exactly for the requests the report and model download routes take, lane or not."""
    app = create_app(api_settings(runtime), runtime)
    assert app.lane is not None
    assert app.is_round_request(method, path) is report
    app.lane = None  # as for an app the lane stays off for
    assert app.is_round_request(method, path) is report
