"""Server-sent events: the hub of live subscribers and the `GET /v1/events` stream.

A stream registers with the hub before it replays from the database, so a notification committed
in between arrives by both paths; the stream sends each seq once, in increasing order.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Annotated
from uuid import UUID

import structlog
from fastapi import APIRouter, Header, Query
from sqlalchemy import select
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.notifier.deps import ErrorMappingRoute, NotifierStopping, authenticate
from services.notifier.models import Notification, NotificationReceiver
from services.notifier.payloads import KEEPALIVE, LiveNotification, dumps, sse_frame
from shared.auth import PrincipalCache, bearer_token
from shared.db.uow import UnitOfWorkFactory
from shared.errors import MalformedPayload
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


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` that ends as soon as the client disconnects, whatever the ASGI version.

    Starlette watches for a disconnect only below ASGI 2.4; above, it notices only at the next
    write, up to a keepalive later. `on_close` runs however the stream ends.
    """

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        super().__init__(
            frames,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._frames = frames
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream until the frames end or the client goes, whichever comes first."""
        streaming = asyncio.ensure_future(self.stream_response(send))
        watching = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self._frames.aclose()
            self._on_close()
        failure = None if streaming.cancelled() else streaming.exception()
        # A write to a vanished client is how ASGI 2.4 servers report a disconnect: not an error.
        if failure is not None and not isinstance(failure, OSError):
            raise failure


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def events_router(
    hub: Hub, uow: UnitOfWorkFactory, keepalive_s: float, principals: PrincipalCache | None = None
) -> APIRouter:
    """The `GET /v1/events` route over `hub` and the database behind `uow` (callers from `principals`)."""
    router = APIRouter(route_class=ErrorMappingRoute, tags=["notifications"])

    @router.get("/v1/events", status_code=200, response_class=EventStreamResponse, response_model=None)
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
        if authorization is None and access_token is not None:
            token = access_token
        else:
            token = bearer_token(authorization)
        principal_id = await authenticate(uow, token, principals)
        after = _parse_last_event_id(
            last_event_id_header if last_event_id_header is not None else last_event_id
        )
        sub = hub.subscribe(principal_id, training_id)
        try:
            missed = None if after is None else replay(uow, principal_id, after, training_id)
            frames = event_frames(sub, missed, after, keepalive_s)
            log.info(
                "events.stream_opened",
                principal_id=str(principal_id),
                training_id=str(training_id) if training_id else None,
                last_event_id=after,
            )
            return EventStreamResponse(frames, on_close=lambda: hub.unsubscribe(sub))
        except BaseException:
            hub.unsubscribe(sub)
            raise

    return router


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
