"""A resilient `GET /v1/events` stream: reconnects with `Last-Event-ID`, backoff and jitter."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

import aiohttp
import structlog

from fedhub.client.errors import ClientError, ServerUnreachable, error_from_response
from fedhub.client.sse import ServerSentEvent, SSEParser
from fedhub.client.transport import TRANSPORT_ERRORS, Reply, Transport, describe, is_retryable_status

log = structlog.get_logger(component="fedhub.client")

# The server sends a keepalive comment every 15 s; hearing nothing for three of those means the
# connection is dead even if TCP has not noticed.
DEFAULT_IDLE_TIMEOUT_S = 45.0


@dataclass(frozen=True, slots=True)
class Connected:
    """Yielded each time the stream (re)connects, before any event read on that connection.

    A consumer can use it to catch up on state it may have missed while disconnected.
    """

    connection: int
    last_event_id: str


class EventStream:
    """Server-sent events from one endpoint, across as many connections as it takes.

    Iterating yields `Connected` after every successful connect and then the `ServerSentEvent`s read.
    A dropped or cleanly ended connection is re-opened with `Last-Event-ID`, after a backoff from the
    transport's `RetryPolicy` (at least the server's `retry:` hint). Consecutive failed connects beyond
    the policy's attempts raise `ServerUnreachable`; a 4xx answer raises `ClientError` at once.
    """

    def __init__(
        self,
        transport: Transport,
        path: str = "/v1/events",
        *,
        params: Callable[[], Mapping[str, str]] | None = None,
        last_event_id: str | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self._transport = transport
        self._path = path
        self._params = params or dict
        self._parser = SSEParser(last_event_id or "")
        self._idle_timeout_s = idle_timeout_s
        self._response: aiohttp.ClientResponse | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending: deque[ServerSentEvent | Connected] = deque()
        self._connections = 0
        self._dropped = False

    @property
    def last_event_id(self) -> str:
        """The id of the last event dispatched ("" before any), sent as `Last-Event-ID` on reconnect."""
        return self._parser.last_event_id

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ServerSentEvent | Connected:
        while not self._pending:
            if self._chunks is None:
                await self._connect()
                continue
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                await self._drop("stream ended")
                continue
            except TRANSPORT_ERRORS as exc:
                await self._drop(describe(exc))
                continue
            self._pending.extend(self._parser.feed(chunk))
        return self._pending.popleft()

    async def _connect(self) -> None:
        policy = self._transport.retry
        failure = ""
        for attempt in range(policy.attempts):
            if self._dropped or attempt > 0:
                await asyncio.sleep(self._backoff(attempt))
            self._dropped = False
            try:
                response = await self._open()
            except TRANSPORT_ERRORS as exc:
                log.warning("events.connect_failed", error=type(exc).__name__, attempt=attempt + 1)
                failure = describe(exc)
                continue
            if response.status == 200:
                content_type = response.headers.get("Content-Type", "")
                if not content_type.startswith("text/event-stream"):
                    response.close()
                    raise ClientError(200, "NotAnEventStream", f"{self._path} answered {content_type!r}")
                self._accept(response)
                return
            try:
                reply = await Reply.read(response)
            except TRANSPORT_ERRORS as exc:
                failure = describe(exc)
                continue
            finally:
                response.release()
            if not is_retryable_status(reply.status_code):
                raise error_from_response(reply)
            failure = str(error_from_response(reply))
            log.warning("events.connect_failed", status=reply.status_code, attempt=attempt + 1)
        raise ServerUnreachable(f"GET {self._path}: {policy.attempts} attempts failed, last: {failure}")

    async def _open(self) -> aiohttp.ClientResponse:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        return await self._transport.http.get(
            self._transport.url(self._path),
            params=dict(self._params()),
            headers=self._transport.headers(headers),
            allow_redirects=False,
            # A read waits at most the idle timeout: the server's keepalives arrive well within it.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=self._idle_timeout_s),
        )

    def _accept(self, response: aiohttp.ClientResponse) -> None:
        self._connections += 1
        self._response = response
        self._chunks = response.content.iter_any()
        self._parser.reset()
        log.info("events.connected", connection=self._connections, last_event_id=self.last_event_id)
        self._pending.append(Connected(connection=self._connections, last_event_id=self.last_event_id))

    def _backoff(self, attempt: int) -> float:
        policy = self._transport.retry
        hint = (self._parser.retry or 0) / 1000
        return max(policy.delay(attempt), min(hint, policy.cap))

    async def _drop(self, reason: str) -> None:
        log.warning("events.disconnected", reason=reason, last_event_id=self.last_event_id)
        await self._close_response()
        self._dropped = True

    async def _close_response(self) -> None:
        response = self._response
        self._response, self._chunks = None, None
        if response is not None:
            # Closed, not released: a stream read only in part cannot carry another request.
            response.close()

    async def aclose(self) -> None:
        """Close the current connection; iterating afterwards would open a new one."""
        await self._close_response()
