"""`GET /v1/events` served by its own route (`EventStreamRoute`) before the documented FastAPI one:
the same answers as the FastAPI route gives, and the stream never enters FastAPI's route machinery."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from services.notifier.sse import EventStreamRoute, events_router
from tests.notifier.conftest import emit, make_principal, notification, open_stream, serve


def _answer(resp: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    return (
        resp.status_code,
        resp.json() if resp.headers.get("content-type", "").startswith("application/json") else resp.text,
        resp.headers.get("content-type"),
        resp.headers.get("www-authenticate"),
    )


async def test_the_stream_route_comes_first_and_answers_as_the_documented_route(server) -> None:
    """Through the notifier's app (its own route first) and through an app with only the documented
    route: the same status, body and headers for every refusal, the same stream for a caller."""
    app = server.notifier
    client = await make_principal(server.runtime, "client")
    documented = FastAPI()
    documented.include_router(events_router(app.stream))
    requests: dict[str, dict[str, Any]] = {
        "no token": {},
        "unknown token": {"headers": {"Authorization": "Bearer fh_nope"}},
        "not bearer": {"headers": {"Authorization": "Basic abc"}},
        "bad Last-Event-ID": {"headers": {**client.headers, "Last-Event-ID": "abc"}},
        "negative Last-Event-ID": {"params": {"last_event_id": "-3", "access_token": client.token}},
        "bad training id": {"headers": client.headers, "params": {"training_id": "x"}},
        "bad training id, no token": {"params": {"training_id": "x"}},
        "empty access token": {"params": {"access_token": ""}},
    }
    async with serve(documented) as documented_url:
        async with (
            httpx.AsyncClient(base_url=server.url) as own,
            httpx.AsyncClient(base_url=documented_url) as fastapi,
        ):
            for name, kwargs in requests.items():
                mine, theirs = (
                    await own.get("/v1/events", **kwargs),
                    await fastapi.get("/v1/events", **kwargs),
                )
                assert _answer(mine) == _answer(theirs), name
                assert 400 <= mine.status_code < 500, name
            head = await own.head("/v1/events", headers=client.headers)
            assert head.status_code == 405
        for url in (server.url, documented_url):
            async with open_stream(url, headers=client.headers) as stream:
                assert stream.response.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert stream.response.headers["cache-control"] == "no-cache"
                sent = await emit(server.runtime, notification([client.id]))
                assert (await stream.next()).data["event_id"] == str(sent.event_id)


async def test_the_notifier_serves_streams_from_its_own_route(start_notifier, monkeypatch) -> None:
    """`Notifier.serve_on` puts the stream's route before every other: a stream never reaches the
    documented FastAPI route's endpoint."""
    from services.notifier import sse

    reached: list[str] = []
    original = sse._Streamed.__init__

    def spy(self: Any, stream: Any) -> None:
        reached.append("fastapi")
        original(self, stream)

    monkeypatch.setattr(sse._Streamed, "__init__", spy)
    async with start_notifier() as server:
        client = await make_principal(server.runtime, "client")
        async with open_stream(server.url, headers=client.headers) as stream:
            sent = await emit(server.runtime, notification([client.id]))
            assert (await stream.next()).data["event_id"] == str(sent.event_id)
    assert reached == []
    other = FastAPI()
    server.notifier.serve_on(other)
    first = other.router.routes[0]
    assert isinstance(first, EventStreamRoute) and first.app is server.notifier.stream


def test_the_stream_route_takes_get_only() -> None:
    route = EventStreamRoute(object())  # type: ignore[arg-type]
    assert route.methods == {"GET"} and route.path == "/v1/events"
