"""`GET /v1/events` over a real uvicorn server: contract payload, receivers, filters, resume, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import uvicorn
from sqlalchemy import func, select

from services.notifier.direct import stream_first
from services.notifier.models import Notification
from services.notifier.service import StreamEndingServer, create_app
from shared.bus.base import envelope_for
from shared.enums import Role
from shared.runtime import Runtime
from tests.notifier.conftest import (
    WAIT_S,
    emit,
    expected_payload,
    make_principal,
    notification,
    open_stream,
    wait_for,
)


async def test_receiver_gets_the_contract_payload_and_headers(server):
    """A receiver's stream carries `id`, `event` and exactly the contract JSON, with no-cache headers."""
    client = await make_principal(server.runtime, "client-1")
    async with open_stream(server.url, headers=client.headers) as stream:
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        assert stream.response.headers["cache-control"] == "no-cache"
        assert stream.response.headers["x-accel-buffering"] == "no"
        sent = await emit(server.runtime, notification([client.id]))
        event = await stream.next()
    assert event.event == sent.notification_type.value
    assert event.data == expected_payload(sent)
    async with server.runtime.uow() as uow:
        seq = await uow.session.scalar(select(Notification.seq).where(Notification.event_id == sent.event_id))
    assert event.id == seq


async def test_only_receivers_get_a_notification(server):
    """A principal that is not among the receivers never sees the notification."""
    a = await make_principal(server.runtime, "a")
    b = await make_principal(server.runtime, "b", Role.ACTOR)
    async with (
        open_stream(server.url, headers=a.headers) as stream_a,
        open_stream(server.url, headers=b.headers) as stream_b,
    ):
        only_a = await emit(server.runtime, notification([a.id]))
        both = await emit(server.runtime, notification([a.id, b.id]))
        assert [e.data["event_id"] for e in await stream_a.take(2)] == [
            str(only_a.event_id),
            str(both.event_id),
        ]
        assert (await stream_b.next()).data["event_id"] == str(both.event_id)


async def test_training_filter_and_access_token_query(server):
    """`?training_id=` passes only that training's notifications; `?access_token=` authenticates."""
    client = await make_principal(server.runtime, "client")
    wanted = notification([client.id])
    params = {"training_id": str(wanted.training_id), "access_token": client.token}
    async with open_stream(server.url, params=params) as stream:
        await emit(server.runtime, notification([client.id]))  # another training
        await emit(server.runtime, wanted)
        event = await stream.next()
    assert event.data["event_id"] == str(wanted.event_id)
    assert event.data["training_uuid"] == str(wanted.training_id)


async def test_resume_with_last_event_id_replays_exactly_what_was_missed(server):
    """Read 2 of 4, disconnect, reconnect with Last-Event-ID: the other 2 arrive in order, none twice."""
    client = await make_principal(server.runtime, "client")
    sent = [notification([client.id], round=r) for r in range(1, 5)]
    async with open_stream(server.url, headers=client.headers) as stream:
        for message in sent:
            await emit(server.runtime, message)
        first_two = await stream.take(2)
    assert [e.data["body"]["round"] for e in first_two] == [1, 2]
    # All four are stored before the reconnect, so the replay, not the live path, must carry 3 and 4.
    await wait_for(lambda: _stored(server.runtime, 4), "four stored notifications")

    headers = {**client.headers, "Last-Event-ID": str(first_two[-1].id)}
    async with open_stream(server.url, headers=headers) as stream:
        marker = await emit(server.runtime, notification([client.id], round=5))
        rest = await stream.take(3)
    assert [e.data["body"]["round"] for e in rest] == [3, 4, 5]
    assert rest[-1].data["event_id"] == str(marker.event_id)
    ids = [e.id for e in first_two + rest]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


async def test_last_event_id_query_parameter_and_training_filter_on_replay(server):
    """`?last_event_id=0` replays everything stored for the caller, filtered by training."""
    client = await make_principal(server.runtime, "client")
    other = await make_principal(server.runtime, "other")
    mine = await emit(server.runtime, notification([client.id]))
    await emit(server.runtime, notification([other.id], training_id=mine.training_id))
    await emit(server.runtime, notification([client.id]))
    await wait_for(lambda: _stored(server.runtime, 3), "three stored notifications")
    params = {"last_event_id": "0", "training_id": str(mine.training_id)}
    async with open_stream(server.url, headers=client.headers, params=params) as stream:
        replayed = await stream.next()
        marker = await emit(server.runtime, notification([client.id], training_id=mine.training_id))
        live = await stream.next()
    assert replayed.data == expected_payload(mine)
    assert live.data["event_id"] == str(marker.event_id)


async def _stored(runtime: Runtime, n: int) -> bool:
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(func.count()).select_from(Notification)) == n


async def test_duplicate_delivery_stores_and_streams_once(server):
    """The same envelope handled twice and published again on the bus: one row, one event."""
    client = await make_principal(server.runtime, "client")
    message = notification([client.id])
    envelope = envelope_for(message)
    async with open_stream(server.url, headers=client.headers) as stream:
        await server.notifier.consumer.handle(envelope)
        await server.notifier.consumer.handle(envelope)
        await server.runtime.bus.publish([envelope])
        marker = await emit(server.runtime, notification([client.id]))
        events = await stream.take(2)
    assert [e.data["event_id"] for e in events] == [str(message.event_id), str(marker.event_id)]
    async with server.runtime.uow() as uow:
        count = await uow.session.scalar(
            select(func.count()).select_from(Notification).where(Notification.event_id == message.event_id)
        )
    assert count == 1


async def test_same_event_id_under_another_message_id_is_stored_once(server):
    """An issuer that emits one notification twice (two message ids) still yields one row."""
    client = await make_principal(server.runtime, "client")
    message = notification([client.id])
    await server.notifier.consumer.handle(envelope_for(message))
    await server.notifier.consumer.handle(envelope_for(message))
    async with server.runtime.uow() as uow:
        count = await uow.session.scalar(select(func.count()).select_from(Notification))
    assert count == 1


async def test_keepalive_comments(start_notifier):
    """An idle stream gets `: keepalive` comments every `keepalive_s`."""
    async with start_notifier(keepalive_s=0.05) as server:
        client = await make_principal(server.runtime, "client")
        async with open_stream(server.url, headers=client.headers) as stream:
            await stream.until_comment(": keepalive")
            await stream.until_comment(": keepalive")
            sent = await emit(server.runtime, notification([client.id]))
            assert (await stream.next()).data["event_id"] == str(sent.event_id)


async def test_errors_are_json(server):
    """No token, an unknown token, a bad Last-Event-ID and a bad training id answer the error shape."""
    client = await make_principal(server.runtime, "client")
    async with httpx.AsyncClient(base_url=server.url) as http:
        missing = await http.get("/v1/events")
        unknown = await http.get("/v1/events", headers={"Authorization": "Bearer fh_nope"})
        bad_id = await http.get("/v1/events", headers={**client.headers, "Last-Event-ID": "abc"})
        bad_training = await http.get("/v1/events", headers=client.headers, params={"training_id": "x"})
    assert missing.status_code == 401
    assert missing.json()["error"] == "Unauthenticated"
    assert set(missing.json()) == {"error", "detail"}
    assert unknown.status_code == 401
    assert unknown.json()["error"] == "Unauthenticated"
    assert bad_id.status_code == 400
    assert bad_id.json()["error"] == "MalformedPayload"
    assert bad_training.status_code == 422
    assert bad_training.json()["error"] == "ValidationError"
    assert "training_id" in bad_training.json()["detail"]


async def test_client_disconnect_unregisters_the_stream(server):
    """Closing the connection removes the subscriber from the hub promptly."""
    client = await make_principal(server.runtime, "client")
    async with open_stream(server.url, headers=client.headers):
        await wait_for(lambda: len(server.notifier.hub) == 1, "the stream to register")
    await wait_for(lambda: len(server.notifier.hub) == 0, "the stream to unregister")


async def test_stop_ends_open_streams_and_refuses_new_ones(server):
    """`Notifier.stop()` ends open streams at once; a new stream is then refused with 503."""
    client = await make_principal(server.runtime, "client")
    async with open_stream(server.url, headers=client.headers) as stream:
        await server.notifier.stop()
        assert await stream.until_end() == []
    async with httpx.AsyncClient(base_url=server.url) as http:
        refused = await http.get("/v1/events", headers=client.headers)
    assert refused.status_code == 503
    assert refused.json()["error"] == "NotifierStopping"


async def test_stream_ending_server_shuts_down_with_an_open_stream(runtime, settings, served_by):
    """uvicorn shutdown does not hang on an open stream when run by `StreamEndingServer`."""
    app = create_app(settings, runtime)
    http = stream_first(lambda: app.state.notifier.stream) if served_by == "socket" else "auto"
    client = await make_principal(runtime, "client")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_level="warning", lifespan="on", http=http)
    server = StreamEndingServer(config, lambda: app.state.notifier.end_streams())
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: server.started, "uvicorn to start")
        async with open_stream(url, headers=client.headers) as stream:
            await wait_for(lambda: len(app.state.notifier.hub) == 1, "the stream to register")
            server.should_exit = True
            assert await stream.until_end() == []
            async with asyncio.timeout(WAIT_S):
                await serving
    finally:
        server.should_exit = True
        sock.close()
    assert len(app.state.notifier.hub) == 0


async def test_callers_are_checked_at_most_stream_admissions_at_a_time(start_notifier, monkeypatch):
    """Streams opening together wait for their caller check in turn (`stream_admissions` at once);
    every one of them opens."""
    from services.notifier import sse

    checking, most = 0, 0
    original = sse.authenticate

    async def counted(*args, **kwargs):
        nonlocal checking, most
        checking += 1
        most = max(most, checking)
        try:
            await asyncio.sleep(0.02)
            return await original(*args, **kwargs)
        finally:
            checking -= 1

    monkeypatch.setattr(sse, "authenticate", counted)
    async with start_notifier(stream_admissions=2) as server:
        clients = [await make_principal(server.runtime, f"client-{i}") for i in range(6)]
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.gather(
                *(stack.enter_async_context(open_stream(server.url, headers=c.headers)) for c in clients)
            )
            await wait_for(lambda: len(server.notifier.hub) == 6, "every stream to register")
    assert most == 2
