"""The API's gate at the socket, and kept-alive connections that keep no request between requests.

Every client keeps one connection to the API open between rounds, and uvicorn's protocol keeps the
last request with it (its scope, headers and cycle) beside its parser and queues: 7.4 KiB of the
server's memory per idle connection with its transport. And when a round's uploads arrive
together, uvicorn reads every one of them and gives each a task, scope, headers and body, although
the app's gate (`services.api.gate`) lets only `max_concurrent_requests` work at once: from 10 to
1,000 clients the API's memory grew by ~27 MiB.

`Gated` is uvicorn's protocol with the gate moved below it. Once a request's head has arrived in
full, the connection takes a slot of one of two `SocketGate`s and uvicorn parses the bytes read:
the clients' round requests (their reports and model downloads, `max_concurrent_requests`: every
client sends them each round, and the reports' database work is done in groups) or any other
(`max_concurrent_other_requests`: each runs queries of its own, and more of them at once than the
database pool holds would wait for a connection inside SQLAlchemy's greenlet, whose saved stack
stays in the process: fewer at once measured both leaner and faster). When every slot is taken
the connection stops reading (the rest of its request stays in the socket) and waits its turn, in
arrival order, holding only the bytes already read. When its answer is sent and nothing of the
request is left unread, the slot passes on and the request's state is dropped, with the parser
and the empty pipeline queue (made again for the next request); its flow control makes no event
until writing pauses (`LeanFlow`): 2.6 KiB per idle connection.
Requests the app's
gate lets through at once (event streams and probes, `gate.UNGATED`) take no slot. The app's gate
stays, for a server other than this protocol.

`gated_connections(...)` makes the `uvicorn.Config(http=...)` protocol class: a class per server,
each with its own gates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.api.gate import UNGATED, WAITING
from shared.metrics import REGISTRY

_NO_PIPELINE = ()
"""An idle connection's pipeline: none (uvicorn only appends to it while a request is worked on)."""

HEAD_LIMIT = 64 * 1024
"""A head not complete within this many bytes is parsed as it is (uvicorn answers it)."""

_UNGATED = tuple(prefix.encode() for prefix in UNGATED)

GATED = REGISTRY.counter(
    "fedhub_api_socket_gate_requests_total",
    "Requests that took a slot at the API's gate at the socket (services/api/connections.py)",
)


class LeanFlow:
    """uvicorn's `FlowControl` (the same attributes and methods) without an `asyncio.Event` per
    connection: the event, made when the transport first asks to pause writing, is what a response
    waits on to write on. uvicorn's made one for every connection, with its waiter queue: ~1 KiB
    of each idle connection's memory, for a pause most connections never see."""

    __slots__ = ("_transport", "_writable", "read_paused", "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._writable: asyncio.Event | None = None
        self.read_paused = False
        self.write_paused = False

    async def drain(self) -> None:
        """Until the transport takes writes again."""
        if self._writable is not None:
            await self._writable.wait()

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()

    def resume_writing(self) -> None:
        if self.write_paused:
            self.write_paused = False
            if self._writable is not None:
                self._writable.set()


class SocketGate:
    """`limit` slots for connections with a request to work on; the rest wait in arrival order."""

    __slots__ = ("_free", "_waiting")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the gate needs a limit of at least 1")
        self._free = limit
        self._waiting: dict[Gated, float] = {}

    def take(self, connection: Gated) -> bool:
        """A slot for `connection` now (True), or a place in the queue (False: `admit` comes later)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        self._waiting[connection] = time.monotonic()
        return False

    def leave(self, connection: Gated) -> None:
        """`connection` no longer waits (it closed)."""
        self._waiting.pop(connection, None)

    def release(self) -> None:
        """A slot is free: the connection waiting longest gets it."""
        if self._waiting:
            connection = next(iter(self._waiting))
            WAITING.observe(time.monotonic() - self._waiting.pop(connection))
            connection.admit(self)
        else:
            self._free += 1

    @property
    def waiting(self) -> int:
        """Connections waiting for a slot."""
        return len(self._waiting)


@dataclass(frozen=True, slots=True)
class Gates:
    """A server's gates: one for the clients' round requests, one for every other request it gates."""

    rounds: SocketGate
    others: SocketGate
    is_round: Callable[[str, str], bool]
    """Whether a request (method, path) is one of a client's round requests (a report, a download)."""

    def of(self, head: bytes) -> SocketGate | None:
        """The gate of the request `head` starts (None: an ungated one)."""
        method, _, rest = head[: head.find(b"\r\n")].partition(b" ")
        target = rest.partition(b" ")[0]
        if target.startswith(_UNGATED):
            return None
        try:
            path = target.partition(b"?")[0].decode("ascii")
        except UnicodeDecodeError:
            return self.others
        return self.rounds if self.is_round(method.decode("latin-1"), path) else self.others


def _parser(protocol: HttpToolsProtocol) -> httptools.HttpRequestParser:
    """A request parser for `protocol`, as uvicorn makes one for each connection."""
    parser = httptools.HttpRequestParser(protocol)
    with contextlib.suppress(AttributeError):  # httptools < 0.6.3
        parser.set_dangerous_leniencies(lenient_data_after_close=True)
    return parser


def gated_connections(rounds: int, others: int, is_round: Callable[[str, str], bool]) -> type[Gated]:
    """A protocol class for `uvicorn.Config(http=...)`: at most `rounds` connections with one of
    a client's round requests (`is_round(method, path)`) and `others` with another request worked
    on at once, the rest waiting unread (see the module doc)."""

    class GatedHere(Gated):
        _gates = Gates(SocketGate(rounds), SocketGate(others), is_round)

    return GatedHere


class Gated(HttpToolsProtocol):
    """uvicorn's HTTP protocol behind a `SocketGate`, dropping each request's state once answered."""

    # Slots, not more keys in the instance's dict: uvicorn's protocol has nearly the 30 attributes
    # past which Python gives every instance a dict of its own instead of sharing the class's keys
    # (+1.7 KiB per connection, measured).
    __slots__ = ("_held", "_in_message", "_last", "_slot", "_waiting")

    _gates: ClassVar[Gates]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # No parser nor pipeline queue until a request has a slot (`_feed`): a connection whose first
        # request waits its turn holds neither.
        self.parser = None  # type: ignore[assignment]
        self.pipeline = _NO_PIPELINE  # type: ignore[assignment]
        self._slot: SocketGate | None = None
        """The gate whose slot this connection holds."""
        self._held = b""
        """What was read of a request that has no slot yet."""
        self._waiting: SocketGate | None = None
        """The gate this connection waits at for a slot."""
        self._in_message = False
        self._last = False
        """Shut down while waiting: answered, then closed."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = LeanFlow(transport)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._slot is not None or not self._between_requests():
            self._feed(data)
            return
        self._unset_keepalive_if_required()
        held = self._held + data
        self._held = held
        if self._waiting is not None or (held.find(b"\r\n\r\n") < 0 and len(held) <= HEAD_LIMIT):
            return  # its turn has not come, or its head is not all here
        gate = self._gates.of(held)
        if gate is None:
            self._held = b""
            self._feed(held)
        elif gate.take(self):
            self.admit(gate)
        else:
            self._waiting = gate
            self.transport.pause_reading()

    def admit(self, gate: SocketGate) -> None:
        """A slot of `gate` is this connection's: parse what was held."""
        held, self._held = self._held, b""
        self._slot = gate
        GATED.inc()
        if self._waiting is not None:
            self._waiting = None
            self.transport.resume_reading()
        self._feed(held)
        if self._last:
            super().shutdown()

    def _feed(self, data: bytes) -> None:
        if self.parser is None:  # dropped between requests (`_done`)
            self.parser = _parser(self)
            self.pipeline = deque()
        super().data_received(data)
        # Answered and now read to its end (e.g. the rest of a body its answer did not wait for).
        if self._slot is not None and self._between_requests():
            self._done()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_message = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._between_requests():
            self._done()

    def _between_requests(self) -> bool:
        """Whether nothing is being read, answered or queued on the connection."""
        return (
            not self._in_message
            and not self.pipeline
            and (self.cycle is None or self.cycle.response_complete)
            and self.transport.get_protocol() is self
        )

    def _done(self) -> None:
        """The request is answered and read: free its slot, drop its state, the parser and the
        (empty) pipeline queue with it (~1.7 KiB per idle connection; a new request gets new ones)."""
        # The request's task may still be finishing: it holds its own cycle and scope.
        self.cycle = self.scope = self.headers = None  # type: ignore[assignment]
        self.url = b""
        if not self.transport.is_closing():
            self.parser = None  # type: ignore[assignment]
            self.pipeline = _NO_PIPELINE  # type: ignore[assignment]
        self._release()

    def _release(self) -> None:
        gate, self._slot = self._slot, None
        if gate is not None:
            gate.release()

    def shutdown(self) -> None:
        """The server stops: a request waiting for its turn is answered, then the connection closes."""
        if self._waiting is not None:
            self._last = True
        else:
            super().shutdown()

    def handle_websocket_upgrade(self) -> None:
        self._release()  # the connection is the WebSocket protocol's from here on
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._waiting is not None:
            self._waiting.leave(self)
            self._waiting = None
        self._held = b""
        self._release()
