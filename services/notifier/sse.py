"""Server-sent events: the hub of live subscribers and the `GET /v1/events` stream.

A stream registers with the hub before it replays from the database, so a notification committed
in between arrives by both paths; the stream sends each seq once, in increasing order.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from typing import Annotated
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

CLIENT_LEFT = "client left"
"""Why a stream's subscription ended when its client disconnected (`EventStream`)."""

REPLAY_PAGE = 500
"""Notifications read per replay query; no transaction stays open while a page is sent."""


class Subscription:
    """One open stream's buffer of live notifications; ended by the hub on overflow or shutdown."""

    def __init__(self, principal_id: UUID, training_id: UUID | None, maxsize: int) -> None:
        self.principal_id = principal_id
        self.training_id = training_id
        self.ended: str | None = None
        """Why the hub ended this subscription (`overflow`, `shutdown`), None while it is live."""
        self._maxsize = maxsize
        # Unbounded underneath so the end marker always fits; `offer` enforces the bound.
        self._queue: asyncio.Queue[LiveNotification | None] = asyncio.Queue()

    def wants(self, notification: LiveNotification) -> bool:
        """Whether this stream's training filter lets `notification` through."""
        return self.training_id is None or self.training_id == notification.training_id

    def offer(self, notification: LiveNotification) -> bool:
        """Queue `notification` without waiting; a full buffer ends the subscription instead."""
        if self.ended is not None:
            return False
        if self._queue.qsize() >= self._maxsize:
            self.end("overflow")
            return False
        self._queue.put_nowait(notification)
        return True

    def end(self, reason: str) -> None:
        """Drop what is buffered (the client replays it on resume) and wake the stream to finish."""
        if self.ended is not None:
            return
        self.ended = reason
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def get(self) -> LiveNotification | None:
        """The next live notification, or None once the subscription has ended."""
        if self.ended is not None and self._queue.empty():
            return None
        return await self._queue.get()


class Hub:
    """Live subscribers keyed by principal id; publishing never waits on a slow stream."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subscribers: dict[UUID, set[Subscription]] = {}
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
        """Register a stream for `principal_id` (optionally one training's notifications)."""
        if self._closed:
            raise NotifierStopping("the notifier is shutting down; reconnect with Last-Event-ID")
        sub = Subscription(principal_id, training_id, self.queue_size)
        self._subscribers.setdefault(principal_id, set()).add(sub)
        self._count += 1
        self._empty.clear()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget `sub` (idempotent)."""
        subs = self._subscribers.get(sub.principal_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
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
    keepalive_s: float,
) -> AsyncGenerator[bytes, None]:
    """The bytes of one stream: what `missed` replays, then live notifications, with keepalives.

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
        try:
            async with asyncio.timeout(keepalive_s):
                live = await sub.get()
        except TimeoutError:
            yield KEEPALIVE
            continue
        if live is None:
            if sub.ended != CLIENT_LEFT:
                log.info("events.stream_ended", principal_id=str(sub.principal_id), reason=sub.ended)
            return
        if last_sent is not None and live.seq <= last_sent:
            continue
        last_sent = live.seq
        yield live.frame
        # Resumed once the server has taken the frame: the write to this stream is done.
        written = time.time()
        if live.committed_at:
            FANOUT_SECONDS.observe(written - live.committed_at, notification_type=live.notification_type)
        if live.issued_at:
            DELIVERED_SECONDS.observe(written - live.issued_at, notification_type=live.notification_type)


class EventStream:
    """`GET /v1/events` as a plain ASGI app, served by an `EventStreamRoute` placed before the
    documented FastAPI route (which stays for the OpenAPI document).

    An open stream lasts as long as its client listens, and everything its request holds while it
    waits is memory per client: through FastAPI's route machinery and a `StreamingResponse` (two
    tasks and their futures) an idle stream cost the process 34 KiB; here it is one task waiting on
    its subscription and one on the connection. The answers are the FastAPI route's: the same
    parameters (the training id checked first, then the caller), the same error shape, status and
    headers (`deps.error_answer`), the same frames.
    """

    def __init__(
        self, hub: Hub, uow: UnitOfWorkFactory, keepalive_s: float, principals: PrincipalCache | None
    ) -> None:
        self.hub = hub
        self.uow = uow
        self.keepalive_s = keepalive_s
        self.principals = principals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse with the error shape, or stream until the hub ends it or the client leaves."""
        try:
            sub, after = await self._subscribe(scope)
        except (FedhubError, RequestValidationError) as exc:
            await error_answer(exc)(scope, receive, send)
            return
        try:
            missed = None if after is None else replay(self.uow, sub.principal_id, after, sub.training_id)
            frames = event_frames(sub, missed, after, self.keepalive_s)
            log.info(
                "events.stream_opened",
                principal_id=str(sub.principal_id),
                training_id=str(sub.training_id) if sub.training_id else None,
                last_event_id=after,
            )
            watching = asyncio.ensure_future(_end_when_gone(receive, sub))
            try:
                await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
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

    async def _subscribe(self, scope: Scope) -> tuple[Subscription, int | None]:
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value.decode("latin-1"))
        training_id = _query_uuid(query, "training_id")
        authorization = headers.get(b"authorization")
        access_token = query.get("access_token")
        token = (
            access_token
            if authorization is None and access_token is not None
            else bearer_token(authorization)
        )
        principal_id = await authenticate(self.uow, token, self.principals)
        last_event_id = headers.get(b"last-event-id")
        after = _parse_last_event_id(
            last_event_id if last_event_id is not None else query.get("last_event_id")
        )
        return self.hub.subscribe(principal_id, training_id), after


_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


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
