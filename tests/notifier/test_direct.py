"""Event streams served off their connections (`services/notifier/direct.py`): which requests the
socket path takes, what it hands to uvicorn, and how a stream there replays, overflows and ends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import pytest

from services.notifier import direct
from services.notifier.direct import stream_request
from services.notifier.payloads import LiveNotification, sse_frame
from services.notifier.sse import STREAMS_OPENED, EventStream
from tests.notifier.conftest import (
    WAIT_S,
    Caller,
    NotifierServer,
    emit,
    make_principal,
    notification,
    open_stream,
    wait_for,
)


def opened() -> dict[str, float]:
    """Streams opened so far, by what served them."""
    return {kind: STREAMS_OPENED.value(served_by=kind) for kind in ("socket", "asgi")}


def opened_since(before: dict[str, float]) -> dict[str, float]:
    """Streams opened since `before`, by what served them."""
    return {kind: count - before[kind] for kind, count in opened().items()}


@pytest.fixture
def served_by() -> str:
    """Every test here runs the notifier as `fedhub notifier` does: streams off the socket."""
    return "socket"


@contextlib.asynccontextmanager
async def raw_connection(
    server: NotifierServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the notifier, closed on exit."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def stream_head(caller: Caller, extra: str = "", version: str = "1.1") -> bytes:
    """The bytes of a `GET /v1/events` request head."""
    return (
        f"GET /v1/events HTTP/{version}\r\nHost: test\r\nAuthorization: Bearer {caller.token}\r\n{extra}\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("head", "taken"),
    [
        (b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /v1/events?training_id=1&access_token=t HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", True),
        (b"GET /v1/events HTTP/1.0\r\nHost: x\r\n\r\n", True),
        (b"GET /v1/events HTTP/2.0\r\nHost: x\r\n\r\n", False),
        (b"HEAD /v1/events HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"POST /v1/events HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /v1/eventsx HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /v1/events/ HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /v1/events#top HTTP/1.1\r\nHost: x\r\n\r\n", False),
        (b"GET /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n", False),
        (b"GET /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", False),
        (b"GET /v1/events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n", False),
        (b"GET /v1/events HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", False),
        (b"GET /v1/events HTTP/1.1\r\nBad Header\r\n\r\n", False),
    ],
)
def test_only_plain_stream_requests_are_taken(head: bytes, taken: bool) -> None:
    """A GET of exactly `/v1/events` over HTTP/1.1 or 1.0 with no body, upgrade or `Expect`; all
    else is uvicorn's to answer."""
    request = stream_request(head)
    assert (request is not None) is taken
    if request is not None:
        assert (b"host", b"x") in request.headers
        assert request.query_string == (b"training_id=1&access_token=t" if b"?" in head else b"")
        assert request.chunked is (b"HTTP/1.1" in head)


async def test_a_stream_that_opens_its_connection_is_served_off_the_socket(server: NotifierServer) -> None:
    """A fresh connection's stream is served by the socket path, one asked for after another request
    on a kept-alive connection by the app; both deliver the same notifications."""
    client = await make_principal(server.runtime, "client")
    before = opened()
    async with open_stream(server.url, headers=client.headers) as fresh:
        assert opened_since(before) == {"socket": 1, "asgi": 0}
        assert fresh.response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert fresh.response.headers["cache-control"] == "no-cache"
        assert fresh.response.headers["x-accel-buffering"] == "no"
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(WAIT_S)) as http,
        ):
            assert (await http.get("/healthz")).status_code == 200
            async with http.stream("GET", "/v1/events", headers=client.headers) as reused:
                assert reused.status_code == 200
                assert opened_since(before) == {"socket": 1, "asgi": 1}
                sent = await emit(server.runtime, notification([client.id]))
                lines = reused.aiter_lines()
                async with asyncio.timeout(WAIT_S):
                    data = [line async for line in _until_data(lines)]
        assert str(sent.event_id) in data[-1]
        assert (await fresh.next()).data["event_id"] == str(sent.event_id)


async def _until_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        yield line
        if line.startswith("data:"):
            return


async def test_a_head_arriving_in_pieces_is_served_off_the_socket(server: NotifierServer) -> None:
    """The socket path waits for the whole head, however it is cut."""
    client = await make_principal(server.runtime, "client")
    before = opened()
    async with raw_connection(server) as (reader, writer):
        for i, byte in enumerate(stream_head(client)):
            writer.write(bytes([byte]))
            if i % 16 == 0:
                await writer.drain()
                await asyncio.sleep(0.001)
        async with asyncio.timeout(WAIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding: chunked\r\n" in head
        assert opened_since(before) == {"socket": 1, "asgi": 0}
        await emit(server.runtime, notification([client.id]))
        async with asyncio.timeout(WAIT_S):
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
        assert chunk.startswith(b"id: ") and chunk.endswith(b"\n\n\r\n")


async def test_an_http_1_0_stream_sends_its_frames_unchunked_until_the_connection_ends(
    server: NotifierServer,
) -> None:
    """A proxy speaking HTTP/1.0 gets the stream off the socket too: no chunks (HTTP/1.0 has none),
    the frames as they are, and the end of the stream is the end of the connection."""
    client = await make_principal(server.runtime, "client")
    before = opened()
    async with raw_connection(server) as (reader, writer):
        writer.write(stream_head(client, version="1.0"))
        async with asyncio.timeout(WAIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"connection: close\r\n" in head and b"transfer-encoding" not in head
        assert opened_since(before) == {"socket": 1, "asgi": 0}
        sent = await emit(server.runtime, notification([client.id]))
        async with asyncio.timeout(WAIT_S):
            frame = await reader.readuntil(b"\n\n")
        assert frame.startswith(b"id: ") and str(sent.event_id).encode() in frame
        server.notifier.end_streams()
        async with asyncio.timeout(WAIT_S):
            assert await reader.read() == b"", "the stream ends with the connection, no last chunk"


async def test_requests_left_to_uvicorn_are_answered_as_without_the_socket_path(
    server: NotifierServer,
) -> None:
    """A stream request with a body, another path and pipelined requests all reach the app."""
    client = await make_principal(server.runtime, "client")
    before = opened()
    async with raw_connection(server) as (reader, writer):
        writer.write(stream_head(client, "Content-Length: 2\r\n") + b"{}")
        async with asyncio.timeout(WAIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert opened_since(before) == {"socket": 0, "asgi": 1}
    async with raw_connection(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        async with asyncio.timeout(WAIT_S):
            for _ in range(2):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                assert await reader.readexactly(length) == b'{"status":"ok"}'
    async with raw_connection(server) as (reader, writer):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n":  # not a stream from its 5th byte
            writer.write(bytes([byte]))
            await writer.drain()
        async with asyncio.timeout(WAIT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/v1/eventsx", headers=client.headers)).status_code == 404
    assert opened_since(before) == {"socket": 0, "asgi": 1}


async def test_a_failing_admission_is_handed_to_the_app(
    server: NotifierServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admission that fails unexpectedly hands the request to uvicorn: the app admits it afresh."""
    client = await make_principal(server.runtime, "client")
    original = EventStream.admit
    calls: list[str] = []

    async def flaky(self: EventStream, query_string: bytes, headers: Any) -> Any:
        calls.append("admit")
        if len(calls) == 1:
            raise RuntimeError("the database blinked")
        return await original(self, query_string, headers)

    monkeypatch.setattr(EventStream, "admit", flaky)
    before = opened()
    async with open_stream(server.url, headers=client.headers) as stream:
        assert calls == ["admit", "admit"]
        assert opened_since(before) == {"socket": 0, "asgi": 1}
        sent = await emit(server.runtime, notification([client.id]))
        assert (await stream.next()).data["event_id"] == str(sent.event_id)


async def test_a_client_leaving_while_admitted_leaves_nothing(
    server: NotifierServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admission task is cancelled with its connection: no subscriber is ever registered."""
    client = await make_principal(server.runtime, "client")
    entered, release = asyncio.Event(), asyncio.Event()
    original = EventStream.admit
    cancelled: list[bool] = []

    async def slow(self: EventStream, query_string: bytes, headers: Any) -> Any:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return await original(self, query_string, headers)

    monkeypatch.setattr(EventStream, "admit", slow)
    async with raw_connection(server) as (_, writer):
        writer.write(stream_head(client))
        async with asyncio.timeout(WAIT_S):
            await entered.wait()
    await wait_for(lambda: cancelled, "the admission to be cancelled")
    release.set()
    await asyncio.sleep(0.05)
    assert len(server.notifier.hub) == 0


async def test_a_replay_and_live_notifications_meeting_are_sent_once_in_order(
    server: NotifierServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifications published while the replay runs are held, then sent after it without the
    seqs it already sent."""
    client = await make_principal(server.runtime, "client")
    training = uuid4()

    def live(seq: int) -> LiveNotification:
        frame = sse_frame(seq, "UPDATE_ROUND_START", b'{"seq":%d}' % seq)
        return LiveNotification(seq, training, frozenset({client.id}), frame)

    async def replay(*args: Any) -> AsyncIterator[tuple[int, bytes]]:
        yield 4, live(4).frame
        for seq in (5, 6):
            assert server.notifier.hub.publish(live(seq)) == 1
        yield 5, live(5).frame

    monkeypatch.setattr(direct, "replay", replay)
    async with open_stream(server.url, headers={**client.headers, "Last-Event-ID": "3"}) as stream:
        assert [e.id for e in await stream.take(3)] == [4, 5, 6]
        server.notifier.hub.publish(live(7))
        assert (await stream.next()).data == {"seq": 7}


async def test_a_client_that_does_not_read_is_ended_as_overflowing(start_notifier: Any) -> None:
    """Once the connection's buffers are full, `subscriber_queue_size` more notifications end the
    stream; the hub forgets it and the connection is closed."""
    async with start_notifier(subscriber_queue_size=3) as server:
        client = await make_principal(server.runtime, "client")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = server.url.removeprefix("http://").split(":")
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        try:
            await asyncio.get_running_loop().sock_sendall(sock, stream_head(client))
            await wait_for(lambda: len(server.notifier.hub) == 1, "the stream to register")
            (sub,) = server.notifier.hub.of(client.id)
            big = b"x" * 256 * 1024
            published = 0
            while sub.ended is None and published < 1000:
                frame = sse_frame(published + 1, "UPDATE_ROUND_START", big)
                server.notifier.hub.publish(
                    LiveNotification(published + 1, uuid4(), frozenset({client.id}), frame)
                )
                published += 1
            assert sub.ended == "overflow"
            assert len(server.notifier.hub) == 0
            assert published < 1000
        finally:
            sock.close()
