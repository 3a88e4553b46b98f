"""Event streams served straight off their connections, below the ASGI app.

A client keeps its event stream open for as long as it takes part, so what an idle stream holds
is memory per client. Through uvicorn and the app (`sse.EventStream`) that is uvicorn's protocol
and request state, two tasks and their coroutine frames, and the subscription's buffer: ~20 KiB
per stream, 20 MiB for 1,000 clients. Here a stream is one small protocol object beside its
transport, written to by the hub as notifications are published: no task, no timer, no buffer of
its own beyond the transport's (~3.5 KiB per stream with the transport; a bare asyncio connection
is ~1.7; `bench/stream_memory.py`).

`stream_first` makes the uvicorn `http=` protocol class that does it. Each new connection is
looked at once its first request's head has arrived: `GET /v1/events` without a body (HTTP/1.1:
a chunked response; HTTP/1.0, as a proxy may send it: the frames as they are, until the connection
closes) is served here (`SocketStream`) once `EventStream.admit` accepts the caller; every other request,
and every refusal, is handed with the bytes read so far to uvicorn's own protocol, so the app
answers it exactly as it answers any request. A stream asked for on a connection that carried
another request first reaches the app (`EventStream`): the same frames, more memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar
from uuid import UUID

import httptools
import structlog
from fastapi.exceptions import RequestValidationError
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from services.notifier.payloads import KEEPALIVE, LiveNotification
from services.notifier.sse import (
    CLIENT_LEFT,
    STREAM_HEADERS,
    STREAMS_OPENED,
    EventStream,
    StreamCaller,
    Subscriber,
    log_stream_end,
    log_stream_open,
    observe_written,
    replay,
)
from shared.errors import FedhubError

log = structlog.get_logger(component="notifier.direct")

HEAD_LIMIT = 64 * 1024
"""A connection whose first request head is longer than this goes to uvicorn undecided."""

_PATH = b"/v1/events"
_STREAM_PREFIX = b"GET " + _PATH
_HEADERS = b"".join(name + b": " + value + b"\r\n" for name, value in STREAM_HEADERS)
_RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\n" + _HEADERS + b"transfer-encoding: chunked\r\n\r\n"
"""The head of a stream answering HTTP/1.1: its frames are chunks."""
_RESPONSE_HEAD_1_0 = b"HTTP/1.1 200 OK\r\n" + _HEADERS + b"connection: close\r\n\r\n"
"""The head of a stream answering HTTP/1.0 (no chunks there): its body ends when the connection does."""
_LAST_CHUNK = b"0\r\n\r\n"
_UNKNOWN = UUID(int=0)
"""The principal of a stream not yet admitted (it is in no hub until it is)."""


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """The parts of a `GET /v1/events` request head that admitting it needs."""

    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    """Names lower case, in the order sent."""
    chunked: bool = True
    """Whether the response may be chunked (HTTP/1.1), else it ends with the connection (HTTP/1.0)."""


class _Head:
    """httptools callbacks collecting one request head."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


def stream_request(head: bytes) -> StreamRequest | None:
    """`head` (a request's bytes up to and including its blank line) as a stream request, or None
    when this path does not serve it: another method or path, an HTTP version other than 1.1 and
    1.0, a body, an upgrade, an `Expect`, or a head httptools cannot parse (uvicorn then answers it)."""
    if not head.startswith(_STREAM_PREFIX):
        return None
    parsed = _Head()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    version = parser.get_http_version()
    if not parsed.complete or version not in ("1.1", "1.0") or parser.should_upgrade():
        return None
    url = httptools.parse_url(parsed.url)
    if url.path != _PATH or url.fragment:
        return None
    for name, value in parsed.headers:
        if name in (b"transfer-encoding", b"expect", b"upgrade") or (
            name == b"content-length" and value.strip() != b"0"
        ):
            return None
    return StreamRequest(url.query or b"", parsed.headers, chunked=version == "1.1")


def stream_first(
    streams: Callable[[], EventStream | None], http: type[asyncio.Protocol] = AutoHTTPProtocol
) -> type[asyncio.Protocol]:
    """A protocol class for `uvicorn.Config(http=...)`: streams that open their connection are
    served by the `EventStream` that `streams()` returns (None: not yet, or no longer), everything
    else by uvicorn's `http` protocol."""

    class StreamFirst(_StreamFirst):
        _streams = staticmethod(streams)
        _http = http

    return StreamFirst


class _StreamFirst(asyncio.Protocol):
    """A new connection until its first request head has arrived: then a `SocketStream`, or
    uvicorn's protocol fed what was read."""

    __slots__ = ("_head", "_http_protocol", "_transport")

    _http: ClassVar[type[asyncio.Protocol]]

    @staticmethod
    def _streams() -> EventStream | None:
        """The `EventStream` serving streams now; None: hand every request to uvicorn."""
        return None

    def __init__(self, **uvicorn_args: Any) -> None:
        self._http_protocol: Callable[[], asyncio.Protocol] = partial(self._http, **uvicorn_args)
        self._transport: asyncio.Transport | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0 and len(head) <= HEAD_LIMIT and _STREAM_PREFIX.startswith(head[: len(_STREAM_PREFIX)]):
            self._head = head  # the head is not all here, and it may still be a stream's
            return
        stream = self._streams()
        request = stream_request(head) if stream is not None and end + 4 == len(head) else None
        if stream is None or request is None:
            hand_over(self._transport, self._http_protocol(), head)
            return
        served = SocketStream(stream, self._transport, head, self._http_protocol)
        self._transport.set_protocol(served)
        served.admit(request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def hand_over(transport: asyncio.Transport, protocol: asyncio.Protocol, read: bytes) -> None:
    """Make `protocol` the connection's from here on, as if it had read `read` from the start."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if read:
        protocol.data_received(read)


class SocketStream(Subscriber, asyncio.Protocol):
    """One event stream written straight to its connection.

    While its caller is admitted (a task: authentication may read the database) it still holds
    the request's bytes, to hand them to uvicorn if the caller is refused. Once streaming, the hub
    writes each notification to the transport as it publishes it; a stream that replays first
    (`Last-Event-ID`) holds live notifications until the replay is sent. The hub ends a stream
    whose client does not read: `queue_size` notifications written while the transport's buffer
    is above its high-water mark. The client leaving ends it at once (`connection_lost`).
    """

    __slots__ = (
        "_chunked",
        "_head",
        "_http_protocol",
        "_last_sent",
        "_opened",
        "_paused",
        "_pending",
        "_resumed",
        "_sent_at",
        "_stream",
        "_task",
        "_transport",
        "_written_paused",
    )

    def __init__(
        self,
        stream: EventStream,
        transport: asyncio.Transport,
        head: bytes,
        http_protocol: Callable[[], asyncio.Protocol],
    ) -> None:
        super().__init__(_UNKNOWN, None, stream.hub.queue_size)
        self._stream: EventStream | None = stream
        self._transport = transport
        self._head: bytes | None = head
        self._http_protocol: Callable[[], asyncio.Protocol] | None = http_protocol
        self._task: asyncio.Task[None] | None = None
        self._opened = False
        self._pending: list[LiveNotification] | None = None
        self._last_sent: int | None = None
        self._sent_at = 0.0
        self._paused = False
        self._written_paused = 0
        self._resumed: asyncio.Future[None] | None = None
        self._chunked = True

    def admit(self, request: StreamRequest) -> None:
        """Admit the caller and start the stream, or hand the request to uvicorn (a task)."""
        self._chunked = request.chunked
        self._task = asyncio.get_running_loop().create_task(self._open(request))

    async def _open(self, request: StreamRequest) -> None:
        stream = self._stream
        assert stream is not None
        try:
            caller = await stream.admit(request.query_string, request.headers)
            self.principal_id, self.training_id = caller.principal_id, caller.training_id
            if caller.after is not None:
                self._pending = []
            stream.hub.add(self)
        except (FedhubError, RequestValidationError):
            # Refused: the app answers it, as it answers a refusal it meets itself.
            self._refer()
            return
        except Exception:
            log.warning("events.direct_admission_failed", exc_info=True)
            self._refer()
            return
        self._head = self._http_protocol = None
        self._opened = True
        self._sent_at = time.monotonic()
        self._transport.write(_RESPONSE_HEAD if self._chunked else _RESPONSE_HEAD_1_0)
        STREAMS_OPENED.inc(served_by="socket")
        log_stream_open(self, caller.after)
        if caller.after is not None:
            await self._replay(stream, caller)
        self._task = None

    def _refer(self) -> None:
        head, http_protocol = self._head, self._http_protocol
        self._head = self._http_protocol = self._stream = None
        self._task = None
        if self.ended is None and head is not None and http_protocol is not None:
            self.ended = "referred"
            hand_over(self._transport, http_protocol(), head)

    async def _replay(self, stream: EventStream, caller: StreamCaller) -> None:
        """Send what the caller missed, then what arrived live meanwhile, each seq once in order."""
        assert caller.after is not None
        self._last_sent = caller.after
        async for seq, frame in replay(stream.uow, caller.principal_id, caller.after, caller.training_id):
            if self.ended is not None:
                return
            if self._paused:
                self._resumed = asyncio.get_running_loop().create_future()
                await self._resumed
            self._write(frame)
            self._last_sent = seq
        pending, self._pending = self._pending or [], None
        for live in pending:
            self.offer(live)

    def offer(self, notification: LiveNotification) -> bool:
        """Write `notification` now (or hold it while the replay runs); False once the client
        has not read `queue_size` of them."""
        if self.ended is not None:
            return False
        if self._pending is not None:
            if len(self._pending) >= self.queue_size:
                self.end("overflow")
                return False
            self._pending.append(notification)
            return True
        if self._last_sent is not None and notification.seq <= self._last_sent:
            return True
        if self._paused:
            self._written_paused += 1
            if self._written_paused > self.queue_size:
                self.end("overflow")
                return False
        self._write(notification.frame)
        self._last_sent = notification.seq
        observe_written(notification)
        return True

    def keepalive(self, idle_since: float) -> None:
        """Write a keepalive comment if nothing was written since `idle_since`."""
        if self._opened and self.ended is None and self._sent_at <= idle_since and not self._paused:
            self._write(KEEPALIVE)

    def end(self, reason: str) -> None:
        """End the response (its last chunk) and close the connection."""
        if self.ended is not None:
            return
        self.ended = reason
        self._pending = None
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._opened and self._chunked and not self._transport.is_closing():
            self._transport.write(_LAST_CHUNK)
        self._transport.close()
        log_stream_end(self)
        if self._stream is not None:
            self._stream.hub.unsubscribe(self)

    def _write(self, frame: bytes) -> None:
        self._transport.write(b"%x\r\n%b\r\n" % (len(frame), frame) if self._chunked else frame)
        self._sent_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        """What a client sends after its request is not read (a stream answers one request)."""

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._written_paused = 0
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:
            self.ended = CLIENT_LEFT
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._resumed is not None and not self._resumed.done():
            self._resumed.cancel()
        if self._stream is not None:
            self._stream.hub.unsubscribe(self)
