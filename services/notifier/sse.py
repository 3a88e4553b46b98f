"""Server-sent events: the hub of live subscribers and the `GET /v1/events` stream.

A stream registers with the hub before it replays from the database, so a notification committed
in between arrives by both paths; the stream sends each seq once, in increasing order.
"""

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Annotated, TypeVar
from urllib.parse import parse_qsl
from uuid import UUID

import structlog
from fastapi import APIRouter, Header, Query
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.notifier.deps import ErrorMappingRoute, NotifierStopping, authenticate, error_answer
from services.notifier.models import Notification, NotificationReceiver
from services.notifier.payloads import KEEPALIVE, LiveNotification, dumps, sse_frame
from shared.auth import PrincipalCache, bearer_token
from shared.db.uow import UnitOfWorkFactory
from shared.errors import FedhubError, MalformedPayload
from shared.http_metrics import LabelledRoute
from shared.http_params import uuid_param
from shared.metrics import REGISTRY

log = structlog.get_logger(component="notifier.sse")

FANOUT_SECONDS = REGISTRY.histogram(
    "fedhub_notification_fanout_seconds",
    "From the commit storing a notification to its frame written to one live stream (per stream)",
    ("notification_type",),
)
DELIVERED_SECONDS = REGISTRY.histogram(
    "fedhub_notification_delivered_seconds",
    "From a notification's issue to its frame written to one live stream (per stream)",
    ("notification_type",),
)

STREAMS_OPENED = REGISTRY.counter(
    "fedhub_event_streams_opened_total",
    "Event streams opened, by what serves them: `socket` (off the connection, below the app) or `asgi`",
    ("served_by",),
)

CLIENT_LEFT = "client left"
"""Why a stream's subscription ended when its client disconnected."""

REPLAY_PAGE = 500
"""Notifications read per replay query; no transaction stays open while a page is sent."""


class Subscriber:
    """What the hub holds for one open stream: whose it is, its filter, and how to hand it a
    notification. `Subscription` buffers for a stream served through the app (`EventStream`);
    `services.notifier.direct.SocketStream` writes straight to its connection."""

    __slots__ = ("ended", "principal_id", "queue_size", "training_id")

    def __init__(self, principal_id: UUID, training_id: UUID | None, queue_size: int) -> None:
        self.principal_id = principal_id
        self.training_id = training_id
        self.queue_size = queue_size
        """Live notifications the stream may hold unsent before the hub ends it (`overflow`)."""
        self.ended: str | None = None
        """Why this subscription ended (`overflow`, `shutdown`, `CLIENT_LEFT`), None while it is live."""

    def wants(self, notification: LiveNotification) -> bool:
        """Whether this stream's training filter lets `notification` through."""
        return self.training_id is None or self.training_id == notification.training_id

    def offer(self, notification: LiveNotification) -> bool:
        """Take `notification` without waiting; False (and ended) when the stream cannot keep up."""
        raise NotImplementedError

    def end(self, reason: str) -> None:
        """End the stream (idempotent); what it had not sent the client replays on resume."""
        raise NotImplementedError

    def keepalive(self, idle_since: float) -> None:
        """Send a keepalive comment if nothing was sent since `idle_since` (`time.monotonic()`)."""
        raise NotImplementedError


class Subscription(Subscriber):
    """The buffer of a stream served through the app: what `get` hands to its task, bounded by
    `queue_size`, then an end marker (None) once the hub ends it."""

    __slots__ = ("_items", "_sent_at", "_waiter")

    def __init__(self, principal_id: UUID, training_id: UUID | None, queue_size: int) -> None:
        super().__init__(principal_id, training_id, queue_size)
        # Unbounded underneath so the end marker always fits; `offer` enforces the bound.
        self._items: deque[LiveNotification | bytes | None] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._sent_at = time.monotonic()

    def offer(self, notification: LiveNotification) -> bool:
        """Buffer `notification`; a full buffer ends the subscription instead."""
        if self.ended is not None:
            return False
        if len(self._items) >= self.queue_size:
            self.end("overflow")
            return False
        self._put(notification)
        return True

    def end(self, reason: str) -> None:
        """Drop what is buffered (the client replays it on resume) and wake the stream to finish."""
        if self.ended is not None:
            return
        self.ended = reason
        self._items.clear()
        self._put(None)

    def keepalive(self, idle_since: float) -> None:
        """Buffer `KEEPALIVE` if the stream got nothing since `idle_since` and holds nothing."""
        if self.ended is None and not self._items and self._sent_at <= idle_since:
            self._put(KEEPALIVE)

    @property
    def buffered(self) -> int:
        """How many items `get` has yet to hand out (notifications, keepalives, the end marker)."""
        return len(self._items)

    def _put(self, item: LiveNotification | bytes | None) -> None:
        self._items.append(item)
        self._sent_at = time.monotonic()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> LiveNotification | bytes | None:
        """The next live notification or keepalive comment, or None once the subscription has ended."""
        while not self._items:
            if self.ended is not None:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


_S = TypeVar("_S", bound=Subscriber)


class Hub:
    """Live subscribers keyed by principal id; publishing never waits on a slow stream.

    `keepalives` (a task for the service's lifetime) sends each idle stream a keepalive comment
    every `keepalive_s`, so that no stream keeps a timer of its own.
    """

    def __init__(self, queue_size: int, keepalive_s: float = 15.0) -> None:
        self.queue_size = queue_size
        self.keepalive_s = keepalive_s
        self._subscribers: dict[UUID, list[Subscriber]] = {}
        self._count = 0
        self._closed = False
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return self._count

    @property
    def closed(self) -> bool:
        """True once `close` ran: no new subscriptions."""
        return self._closed

    def subscribe(self, principal_id: UUID, training_id: UUID | None = None) -> Subscription:
        """Register a buffered stream for `principal_id` (optionally one training's notifications)."""
        return self.add(Subscription(principal_id, training_id, self.queue_size))

    def add(self, sub: _S) -> _S:
        """Register `sub`; `NotifierStopping` once the hub is closed."""
        if self._closed:
            raise NotifierStopping("the notifier is shutting down; reconnect with Last-Event-ID")
        self._subscribers.setdefault(sub.principal_id, []).append(sub)
        self._count += 1
        self._empty.clear()
        return sub

    def of(self, principal_id: UUID) -> tuple[Subscriber, ...]:
        """The open streams of `principal_id`."""
        return tuple(self._subscribers.get(principal_id, ()))

    def unsubscribe(self, sub: Subscriber) -> None:
        """Forget `sub` (idempotent)."""
        subs = self._subscribers.get(sub.principal_id)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subscribers[sub.principal_id]
        self._count -= 1
        if self._count == 0:
            self._empty.set()

    def publish(self, notification: LiveNotification) -> int:
        """Offer `notification` to every live stream of its receivers; return how many took it."""
        if self._closed:
            return 0
        if len(notification.receivers) <= len(self._subscribers):
            targets = [s for p in notification.receivers for s in self._subscribers.get(p, ())]
        else:
            targets = [
                s for p, subs in self._subscribers.items() if p in notification.receivers for s in subs
            ]
        delivered = 0
        for sub in targets:
            if not sub.wants(notification):
                continue
            if sub.offer(notification):
                delivered += 1
            else:
                log.warning(
                    "events.subscriber_overflowed", principal_id=str(sub.principal_id), seq=notification.seq
                )
                self.unsubscribe(sub)
        return delivered

    def tick(self, now: float) -> None:
        """Send a keepalive to every stream that sent nothing in the last `keepalive_s` before `now`."""
        idle_since = now - self.keepalive_s
        for subs in list(self._subscribers.values()):
            for sub in subs:
                sub.keepalive(idle_since)

    async def keepalives(self) -> None:
        """Tick every half `keepalive_s` until cancelled: an idle stream hears something every
        `keepalive_s` to 1.5 `keepalive_s`."""
        while True:
            await asyncio.sleep(self.keepalive_s / 2)
            self.tick(time.monotonic())

    def close(self) -> None:
        """End every open stream and refuse new ones (the service is stopping)."""
        self._closed = True
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.end("shutdown")

    async def wait_empty(self) -> None:
        """Return once no stream is registered."""
        await self._empty.wait()


async def replay(
    uow: UnitOfWorkFactory, principal_id: UUID, after: int, training_id: UUID | None
) -> AsyncGenerator[tuple[int, bytes], None]:
    """`(seq, frame)` of every stored notification for `principal_id` with seq > `after`, in order."""
    while True:
        query = (
            select(Notification.seq, Notification.notification_type, Notification.payload)
            .join(NotificationReceiver, NotificationReceiver.seq == Notification.seq)
            .where(NotificationReceiver.principal_id == principal_id, NotificationReceiver.seq > after)
            .order_by(NotificationReceiver.seq)
            .limit(REPLAY_PAGE)
        )
        if training_id is not None:
            query = query.where(Notification.training_id == training_id)
        async with uow() as unit:
            rows = (await unit.session.execute(query)).all()
        for seq, notification_type, payload in rows:
            yield seq, sse_frame(seq, notification_type, dumps(payload))
            after = seq
        if len(rows) < REPLAY_PAGE:
            return


async def event_frames(
    sub: Subscription,
    missed: AsyncGenerator[tuple[int, bytes], None] | None,
    after: int | None,
) -> AsyncGenerator[bytes, None]:
    """The bytes of one stream: what `missed` replays, then live notifications and the keepalives
    the hub's ticks buffer.

    A live notification whose seq was already sent (it committed between registering and
    replaying) is skipped, so the client sees every seq once and in increasing order.
    """
    last_sent = after
    if missed is not None:
        async with contextlib.aclosing(missed):
            async for seq, frame in missed:
                yield frame
                last_sent = seq
    while True:
        live = await sub.get()
        if live is None:
            log_stream_end(sub)
            return
        if isinstance(live, bytes):
            yield live
            continue
        if last_sent is not None and live.seq <= last_sent:
            continue
        last_sent = live.seq
        yield live.frame
        # Resumed once the server has taken the frame: the write to this stream is done.
        observe_written(live)


def observe_written(live: LiveNotification) -> None:
    """Record how long `live` took from its commit and from its issue to a stream's write (now)."""
    written = time.time()
    if live.committed_at:
        FANOUT_SECONDS.observe(written - live.committed_at, notification_type=live.notification_type)
    if live.issued_at:
        DELIVERED_SECONDS.observe(written - live.issued_at, notification_type=live.notification_type)


def log_stream_end(sub: Subscriber) -> None:
    """Log why the hub ended `sub`'s stream (a client leaving is not worth a line)."""
    if sub.ended != CLIENT_LEFT:
        log.info("events.stream_ended", principal_id=str(sub.principal_id), reason=sub.ended)


def log_stream_open(sub: Subscriber, after: int | None) -> None:
    """Log a stream's start: whose, which training, from which seq."""
    log.info(
        "events.stream_opened",
        principal_id=str(sub.principal_id),
        training_id=str(sub.training_id) if sub.training_id else None,
        last_event_id=after,
    )


@dataclass(frozen=True, slots=True)
class StreamCaller:
    """Who asked for a stream and what they asked for: `EventStream.admit`'s answer."""

    principal_id: UUID
    training_id: UUID | None
    after: int | None
    """The `Last-Event-ID` to replay from; None: live notifications only."""


class EventStream:
    """`GET /v1/events` as a plain ASGI app, served by an `EventStreamRoute` placed before the
    documented FastAPI route (which stays for the OpenAPI document).

    Where fedhub runs uvicorn itself, a stream that opens its connection is served below the app,
    straight off the socket (`services.notifier.direct`); this app serves the rest (a stream on a
    connection that carried other requests first, any other ASGI server) and every refusal. Both
    admit a caller with `admit`, so they answer alike. Through the app an idle stream is one task
    waiting on its subscription and one on the connection (20 KiB of the process per stream at
    1,000; through FastAPI's route machinery and a `StreamingResponse` it was 34). The answers are
    the FastAPI route's: the same parameters (the training id checked first, then the caller), the
    same error shape, status and headers (`deps.error_answer`), the same frames.
    """

    def __init__(
        self, hub: Hub, uow: UnitOfWorkFactory, principals: PrincipalCache | None, admissions: int = 16
    ) -> None:
        self.hub = hub
        self.uow = uow
        self.principals = principals
        # Callers checked at once. When 1,000 clients connect together, each check waiting for a
        # database connection holds a session and a greenlet's stack: unbounded, that peak stayed
        # in the process as ~15 KiB per client on PostgreSQL.
        self._admitting = asyncio.Semaphore(admissions)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse with the error shape, or stream until the hub ends it or the client leaves."""
        try:
            caller = await self.admit(scope.get("query_string", b""), scope["headers"])
            sub = self.hub.subscribe(caller.principal_id, caller.training_id)
        except (FedhubError, RequestValidationError) as exc:
            await error_answer(exc)(scope, receive, send)
            return
        STREAMS_OPENED.inc(served_by="asgi")
        try:
            after = caller.after
            missed = None if after is None else replay(self.uow, sub.principal_id, after, sub.training_id)
            frames = event_frames(sub, missed, after)
            log_stream_open(sub, after)
            watching = asyncio.ensure_future(_end_when_gone(receive, sub))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": STREAM_HEADERS})
                async with contextlib.aclosing(frames):
                    async for frame in frames:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            except OSError:
                pass  # a write to a vanished client is how ASGI 2.4 servers report a disconnect
            finally:
                watching.cancel()
        finally:
            self.hub.unsubscribe(sub)

    async def admit(self, query_string: bytes, headers: Iterable[tuple[bytes, bytes]]) -> StreamCaller:
        """The caller of a stream request and what it asks for, from its query and headers (names
        lower case); raises the refusal (`FedhubError`, or `RequestValidationError` for a bad
        parameter) otherwise."""
        query = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        first: dict[bytes, str] = {}
        for name, value in headers:
            first.setdefault(name, value.decode("latin-1"))
        training_id = _query_uuid(query, "training_id")
        authorization = first.get(b"authorization")
        access_token = query.get("access_token")
        token = (
            access_token
            if authorization is None and access_token is not None
            else bearer_token(authorization)
        )
        async with self._admitting:
            principal_id = await authenticate(self.uow, token, self.principals)
        last_event_id = first.get(b"last-event-id")
        after = _parse_last_event_id(
            last_event_id if last_event_id is not None else query.get("last_event_id")
        )
        return StreamCaller(principal_id, training_id, after)


STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
"""The response headers of an event stream (before the transfer encoding, which the server adds)."""


def _query_uuid(query: dict[str, str], name: str) -> UUID | None:
    """A query parameter that must be a UUID if given; FastAPI's own validation error if not."""
    raw = query.get(name)
    return None if raw is None else uuid_param(raw, "query", name)


async def _end_when_gone(receive: Receive, sub: Subscription) -> None:
    """End `sub` when its client disconnects, so that its stream finishes at once (not at the next
    keepalive write)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    sub.end(CLIENT_LEFT)


class EventStreamRoute(LabelledRoute):
    """The route of an `EventStream`: `GET /v1/events` (HEAD is the FastAPI route's: 405)."""

    def __init__(self, stream: EventStream) -> None:
        super().__init__("/v1/events", stream, methods=["GET"], include_in_schema=False)
        self.methods = {"GET"}


def events_router(stream: EventStream) -> APIRouter:
    """The documented `GET /v1/events` route: its parameters and answers in the OpenAPI document.

    The app serves the route through `stream`'s `EventStreamRoute`, placed before it
    (`Notifier.serve_on`); where that is not mounted this route hands the request to `stream` too,
    once FastAPI has checked the same parameters."""
    router = APIRouter(route_class=ErrorMappingRoute, tags=["notifications"])

    @router.get("/v1/events", status_code=200, response_class=_Streamed, response_model=None)
    async def events(
        authorization: Annotated[str | None, Header()] = None,
        access_token: Annotated[
            str | None, Query(description="for EventSource clients that cannot set headers")
        ] = None,
        training_id: Annotated[UUID | None, Query()] = None,
        last_event_id: Annotated[str | None, Query()] = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    ) -> Response:
        """Server-sent notifications for the caller; `Last-Event-ID` first replays what it missed."""
        return _Streamed(stream)

    return router


class _Streamed(Response):
    """The documented route's answer: the request handed to the `EventStream`."""

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        super().__init__()
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._stream(scope, receive, send)


def _parse_last_event_id(raw: str | None) -> int | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise MalformedPayload(
            f"Last-Event-ID must be a notification seq (an integer), got {raw!r}"
        ) from None
    if value < 0:
        raise MalformedPayload(f"Last-Event-ID must not be negative, got {value}")
    return value
