"""The API's gate at the socket and idle connections without request state
(`services/api/connections.py`), over real TCP to a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from services.api.connections import GATED, Gated, Gates, LeanFlow, SocketGate, gated_connections

WAIT_S = 5.0


@dataclass
class App:
    """An ASGI app: a path with `/slow` waits for `release`; `/early` answers without reading its body;
    everything else answers at once with the length of its body."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[str] = field(default_factory=list)
    running: int = 0
    most_running: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.started.append(path)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            body = b""
            if path != "/early":
                while True:
                    message = await receive()
                    body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
            if "/slow" in path:
                await self.release.wait()
            answer = f"{path} {len(body)}".encode()
            if path.startswith("/big/"):
                answer = bytes(range(256)) * (int(path.removeprefix("/big/")) // 256)
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": answer})
        finally:
            self.running -= 1


@dataclass
class Served:
    """A running server, its app and its connections' gate."""

    server: uvicorn.Server
    app: App
    port: int
    gate: SocketGate
    """The round requests' gate (every POST here but `/other/...`)."""
    others: SocketGate
    task: asyncio.Task[None]
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def idle(self) -> int:
        """Open connections holding no request's state (between requests, or waiting for a slot):
        no cycle, scope or queued request (`parsers` tells whether the parser went too)."""
        return sum(
            isinstance(c, Gated) and c.cycle is None and c.scope is None and not c.pipeline
            for c in self.server.server_state.connections
        )

    def parsers(self) -> int:
        """Open connections holding a request parser."""
        return sum(c.parser is not None for c in self.server.server_state.connections)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A plain TCP connection, closed when the test ends."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[Served] = []

    async def start(limit: int = 2, others: int = 2, keep_alive_s: int = 30) -> Served:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        app = App()
        http = gated_connections(limit, others, is_report)
        config = uvicorn.Config(
            app, lifespan="off", log_level="warning", timeout_keep_alive=keep_alive_s, http=http
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        gates = http._gates
        served = Served(server, app, sock.getsockname()[1], gates.rounds, gates.others, task)
        started.append(served)
        return served

    yield start
    for served in started:
        for writer in served.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        served.app.release.set()
        served.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(served.task, WAIT_S)


def is_report(method: str, path: str) -> bool:
    """The round requests of these tests: every POST but to `/other/...`."""
    return method == "POST" and not path.startswith("/other")


def request(path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response: its head and its body (content-length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await asyncio.wait_for(reader.readexactly(length), WAIT_S)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_a_kept_alive_connection_keeps_no_request_between_requests(serve: Any) -> None:
    served = await serve()
    before = GATED.value()
    reader, writer = await served.connect()
    await until(lambda: served.idle() == 1)
    for i in range(3):
        writer.write(request(f"/fast/{i}", b"x" * i))
        head, body = await answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and body == f"/fast/{i} {i}".encode()
        await until(lambda: served.idle() == 1)
    assert GATED.value() - before == 3
    assert served.parsers() == 0  # an answered connection keeps no parser
    # Its next requests get one again, pipelined ones too.
    writer.write(request("/p/1", b"1") + request("/p/2", b"22"))
    assert [(await answer(reader))[1] for _ in range(2)] == [b"/p/1 1", b"/p/2 2"]
    await until(lambda: served.idle() == 1 and served.parsers() == 0)
    writer.close()
    await until(lambda: not served.server.server_state.connections)


async def test_at_most_limit_requests_work_the_rest_wait_unread_in_arrival_order(serve: Any) -> None:
    served = await serve(limit=2)
    connections = [await served.connect() for _ in range(5)]
    for i, (_, writer) in enumerate(connections):
        writer.write(request(f"/slow/{i}", b"b" * 100 * (i + 1)))
        await until(lambda: len(served.app.started) == min(i + 1, 2) and served.gate.waiting == max(i - 1, 0))  # noqa: B023
    assert served.app.started == ["/slow/0", "/slow/1"]
    # A probe passes a full gate.
    probe_reader, probe_writer = await served.connect()
    probe_writer.write(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
    assert (await answer(probe_reader))[1] == b"/healthz 0"
    served.app.release.set()
    bodies = [(await answer(reader))[1] for reader, _ in connections]
    assert bodies == [f"/slow/{i} {100 * (i + 1)}".encode() for i in range(5)]
    assert served.app.started[:2] == ["/slow/0", "/slow/1"]
    assert [p for p in served.app.started if p.startswith("/slow")] == [f"/slow/{i}" for i in range(5)]
    assert served.app.most_running <= 3  # two gated, and the probe
    await until(lambda: served.gate.waiting == 0 and served.idle() == 6)


async def test_a_connection_waiting_for_its_first_turn_holds_no_parser(serve: Any) -> None:
    served = await serve(limit=1)
    first_reader, first_writer = await served.connect()
    first_writer.write(request("/slow/0"))
    await until(lambda: served.app.started == ["/slow/0"])
    waiting = [await served.connect() for _ in range(3)]
    for _, writer in waiting:
        writer.write(request("/later", b"abc"))
    await until(lambda: served.gate.waiting == 3)
    assert served.parsers() == 1  # the admitted one's; the three new ones wait without
    served.app.release.set()
    assert (await answer(first_reader))[1] == b"/slow/0 0"
    assert [(await answer(reader))[1] for reader, _ in waiting] == [b"/later 3"] * 3
    await until(lambda: served.idle() == 4 and served.parsers() == 0)


async def test_a_response_larger_than_the_socket_takes_waits_for_the_reader(serve: Any) -> None:
    served = await serve()
    reader, writer = await served.connect()
    size = 16 * 1024 * 1024
    writer.write(request(f"/big/{size}"))
    (connection,) = served.server.server_state.connections
    assert isinstance(connection.flow, LeanFlow)
    # Not read: the transport's buffer fills and asks the response to wait.
    await until(lambda: connection.flow.write_paused)
    head, body = await answer(reader)
    assert head.startswith(b"HTTP/1.1 200") and body == bytes(range(256)) * (size // 256)
    await until(lambda: served.idle() == 1 and not connection.flow.write_paused)
    # The connection serves its next request as before.
    writer.write(request("/after", b"xy"))
    assert (await answer(reader))[1] == b"/after 2"


async def test_lean_flow_pauses_and_resumes_as_uvicorns() -> None:
    class Transport:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def pause_reading(self) -> None:
            self.calls.append("pause")

        def resume_reading(self) -> None:
            self.calls.append("resume")

    transport = Transport()
    flow = LeanFlow(transport)  # type: ignore[arg-type]
    await asyncio.wait_for(flow.drain(), WAIT_S)  # writable: returns at once
    flow.pause_reading()
    flow.pause_reading()
    flow.resume_reading()
    flow.resume_reading()
    assert transport.calls == ["pause", "resume"] and not flow.read_paused
    flow.pause_writing()
    assert flow.write_paused
    drained = asyncio.create_task(flow.drain())
    await asyncio.sleep(0.01)
    assert not drained.done()
    flow.resume_writing()
    await asyncio.wait_for(drained, WAIT_S)
    assert not flow.write_paused
    await asyncio.wait_for(flow.drain(), WAIT_S)


async def test_the_rest_of_a_body_its_answer_did_not_wait_for_is_not_taken_for_a_request(
    serve: Any,
) -> None:
    served = await serve()
    reader, writer = await served.connect()
    body = b"z" * 1000
    writer.write(request("/early", body)[:-600])
    assert (await answer(reader))[1] == b"/early 0"
    await asyncio.sleep(0.05)
    writer.write(body[-600:])  # the body's rest: still this request's
    writer.write(request("/after", b"abc"))
    head, answered = await answer(reader)
    assert head.startswith(b"HTTP/1.1 200") and answered == b"/after 3"
    await until(lambda: served.idle() == 1)


async def test_pipelined_requests_are_answered_in_order(serve: Any) -> None:
    served = await serve(limit=1)
    reader, writer = await served.connect()
    writer.write(request("/one", b"1") + request("/two", b"22") + request("/three", b"333"))
    assert [(await answer(reader))[1] for _ in range(3)] == [b"/one 1", b"/two 2", b"/three 3"]
    await until(lambda: served.idle() == 1 and served.gate.waiting == 0)
    # The slot came back: another connection is served.
    other_reader, other_writer = await served.connect()
    other_writer.write(request("/four"))
    assert (await answer(other_reader))[1] == b"/four 0"


async def test_a_head_arriving_in_pieces_is_served_once_whole(serve: Any) -> None:
    served = await serve()
    reader, writer = await served.connect()
    whole = request("/pieces", b"12345")
    for piece in (whole[:7], whole[7:30], whole[30:]):
        writer.write(piece)
        await asyncio.sleep(0.02)
    assert (await answer(reader))[1] == b"/pieces 5"


async def test_a_parked_connection_closes_after_the_keep_alive_time(serve: Any) -> None:
    served = await serve(keep_alive_s=1)
    reader, writer = await served.connect()
    writer.write(request("/fast"))
    await answer(reader)
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # closed by the server
    await until(lambda: not served.server.server_state.connections)


async def test_clients_leaving_give_their_slots_back(serve: Any) -> None:
    """A client that leaves while its request is worked on frees its slot when that ends; one that
    leaves while it waits unread is served in turn (a socket not read shows no close), then freed."""
    served = await serve(limit=1)
    _, working = await served.connect()
    working.write(request("/slow/working"))
    await until(lambda: served.app.started == ["/slow/working"])
    _, waiting = await served.connect()
    waiting.write(request("/slow/waiting"))
    await until(lambda: served.gate.waiting == 1)
    waiting.close()
    working.close()
    await asyncio.sleep(0.05)
    served.app.release.set()
    await until(lambda: served.app.started == ["/slow/working", "/slow/waiting"] and served.app.running == 0)
    await until(lambda: not served.server.server_state.connections)
    reader, writer = await served.connect()
    writer.write(request("/next"))
    assert (await answer(reader))[1] == b"/next 0"


async def test_a_connection_closed_after_its_answer_frees_its_slot(serve: Any) -> None:
    served = await serve(limit=1)
    for i in range(3):
        reader, writer = await served.connect()
        writer.write(request(f"/close/{i}", extra="connection: close\r\n"))
        head, body = await answer(reader)
        assert b"connection: close" in head.lower() and body == f"/close/{i} 0".encode()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""


async def test_shutting_down_answers_waiting_requests_and_closes_idle_connections(serve: Any) -> None:
    served = await serve(limit=1)
    idle_reader, idle = await served.connect()
    idle.write(request("/fast"))
    await answer(idle_reader)
    working_reader, working = await served.connect()
    working.write(request("/slow/working"))
    await until(lambda: served.app.started[-1:] == ["/slow/working"])
    waiting_reader, waiting = await served.connect()
    waiting.write(request("/slow/waiting"))
    await until(lambda: served.gate.waiting == 1)

    served.server.should_exit = True
    assert await asyncio.wait_for(idle_reader.read(), WAIT_S) == b""  # an idle connection closes
    assert not served.task.done()  # the server waits for the requests it has
    served.app.release.set()
    for reader, path in ((working_reader, "/slow/working"), (waiting_reader, "/slow/waiting")):
        head, body = await answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
        assert body == f"{path} 0".encode()
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    await asyncio.wait_for(served.task, WAIT_S)


async def test_reports_and_other_requests_wait_at_gates_of_their_own(serve: Any) -> None:
    served = await serve(limit=1, others=1)
    connections = [await served.connect() for _ in range(4)]
    paths = ["/slow/r0", "/other/slow/o0", "/slow/r1", "/other/slow/o1"]
    for (_, writer), path in zip(connections, paths, strict=True):
        writer.write(request(path))
    await until(lambda: served.gate.waiting == 1 and served.others.waiting == 1)
    assert sorted(served.app.started) == ["/other/slow/o0", "/slow/r0"]  # one of each at once
    get_reader, get_writer = await served.connect()
    get_writer.write(b"GET /slow/g HTTP/1.1\r\nhost: t\r\n\r\n")  # not a report: waits as another
    await until(lambda: served.others.waiting == 2)
    served.app.release.set()
    answered = [(await answer(reader))[1] for reader, _ in [*connections, (get_reader, get_writer)]]
    assert answered == [b"/slow/r0 0", b"/other/slow/o0 0", b"/slow/r1 0", b"/other/slow/o1 0", b"/slow/g 0"]
    assert served.app.most_running == 2


def _updates(method: str, path: str) -> bool:
    return method == "POST" and path.endswith("/updates")


@pytest.mark.parametrize(
    ("head", "gate"),
    [
        (b"POST /v1/trainings/1/updates HTTP/1.1\r\n", "rounds"),
        (b"POST /v1/trainings/1/updates?x=1 HTTP/1.1\r\n", "rounds"),
        (b"GET /v1/trainings/1 HTTP/1.1\r\n", "others"),
        (b"GET /v1/events?training_id=1 HTTP/1.1\r\n", None),
        (b"GET /healthz HTTP/1.1\r\n", None),
        (b"GET /metrics HTTP/1.1\r\n", None),
        (b"POST /v1/tr\xffinings HTTP/1.1\r\n", "others"),
        (b"garbage\r\n", "others"),
    ],
)
def test_each_request_has_its_gate(head: bytes, gate: str | None) -> None:
    gates = Gates(
        SocketGate(1), SocketGate(1), lambda method, path: method == "POST" and path.endswith("/updates")
    )
    chosen = gates.of(head + b"\r\n")
    assert chosen is (None if gate is None else getattr(gates, gate))


def test_a_socket_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SocketGate(0)
