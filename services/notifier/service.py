"""The notifier service: its consumer, live event streams and webhook worker, and its standalone app."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.engine import make_url

from services.notifier import models as _tables  # noqa: F401 - registers the notifier's tables on Base
from services.notifier.direct import stream_first
from services.notifier.handlers import InlineModels, notifier_handlers
from services.notifier.settings import NotifierSettings
from services.notifier.sse import EventStream, EventStreamRoute, Hub, events_router
from services.notifier.webhooks import WebhookWorker, webhook_router
from shared.auth import PrincipalCache
from shared.bus.base import Envelope
from shared.http_metrics import RequestMetrics, metrics_response
from shared.logging import configure_logging
from shared.messaging import Consumer
from shared.runtime import Runtime, collect_less_often, freeze_startup_heap

log = structlog.get_logger(component="notifier")


class Notifier:
    """Pushes `NotificationIssued` to its receivers over server-sent events and webhooks.

    `router` carries `/v1/events` and `/v1/webhook`; whichever app includes it serves them.
    """

    def __init__(self, settings: NotifierSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.hub = Hub(settings.subscriber_queue_size, settings.keepalive_s)
        self.webhooks = WebhookWorker(runtime.uow, settings)
        self.consumer = Consumer(
            "notifier",
            notifier_handlers(
                self.hub.publish,
                self.webhooks.wake,
                InlineModels(runtime.blobs, settings.inline_model_max_bytes),
            ),
            runtime.uow,
        )
        self.principals = PrincipalCache(settings.auth_cache_s)
        self.stream = EventStream(self.hub, runtime.uow, self.principals, settings.stream_admissions)
        self.router = APIRouter()
        self.router.include_router(events_router(self.stream))
        self.router.include_router(webhook_router(runtime.uow, self.principals))
        self._keepalives: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._parked = asyncio.Event()

    async def start(self) -> None:
        """Consume notifications from the bus and start the webhook worker."""
        if self._started:
            return
        self._started = True
        # One message at a time: notifications then commit in seq order, which the streams rely on.
        await self.runtime.bus.subscribe(
            self.consumer.name, self.consumer.routing_keys, self._deliver, prefetch=1
        )
        self.webhooks.start()
        self._keepalives = asyncio.create_task(self.hub.keepalives(), name="notifier-keepalives")
        log.info("notifier.started")

    async def stop(self) -> None:
        """Take no new messages, end open streams, let the message in hand finish, stop the worker.

        Idempotent; call it before the HTTP server waits for open responses (see `StreamEndingServer`).
        """
        if self._stopping:
            return
        self._stopping = True
        self.end_streams()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.shutdown_timeout_s):
                await self._idle.wait()
        await self.webhooks.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.hub.wait_empty()
        if self._keepalives is not None:
            self._keepalives.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalives
        log.info("notifier.stopped", open_streams=len(self.hub))

    def serve_on(self, app: FastAPI) -> None:
        """Serve the notifier's routes from `app`: its router, and the event stream's own route
        (`EventStreamRoute`) before every other, so that streams skip FastAPI's route machinery."""
        app.include_router(self.router)
        app.router.routes.insert(0, EventStreamRoute(self.stream))

    def end_streams(self) -> None:
        """End every open event stream now; clients reconnect elsewhere with `Last-Event-ID`."""
        self.hub.close()

    async def _deliver(self, envelope: Envelope) -> None:
        if self._stopping:
            # Not acknowledging leaves the message to the broker: it goes to another replica or to
            # this one's successor. The bus cancels this wait when it closes.
            await self._parked.wait()
            return
        self._in_flight += 1
        self._idle.clear()
        try:
            await self.consumer.handle(envelope)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class StreamEndingServer(uvicorn.Server):
    """A uvicorn server that ends event streams when it starts shutting down.

    uvicorn waits for open responses before the lifespan shutdown runs, so an event stream would
    hold it until `timeout_graceful_shutdown`; `end_streams` (e.g. `Notifier.end_streams`) ends them.
    """

    def __init__(self, config: uvicorn.Config, end_streams: Callable[[], None]) -> None:
        super().__init__(config)
        self._end_streams = end_streams

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """End the streams, then shut down as uvicorn does."""
        self._end_streams()
        await super().shutdown(sockets)


def create_app(settings: NotifierSettings, runtime: Runtime | None = None) -> FastAPI:
    """The standalone notifier: its routes, `/healthz`, `/readyz`, `/metrics`; `app.state.notifier` once up.

    Without `runtime` the lifespan opens one from `settings` (and creates the tables on SQLite).
    """
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            rt = runtime
            if rt is None:
                is_sqlite = make_url(settings.database_url).get_backend_name() == "sqlite"
                rt = await Runtime.open(settings, create_tables=is_sqlite)
                stack.push_async_callback(rt.close)
            notifier = Notifier(settings, rt)
            # The routes need the runtime, which exists only from here on; Starlette matches
            # routes per request, so adding them before the first request is served is enough.
            notifier.serve_on(app)
            await notifier.start()
            stack.push_async_callback(notifier.stop)
            state["runtime"] = rt
            app.state.notifier = notifier
            if runtime is None:
                freeze_startup_heap()
            yield

    app = FastAPI(title="fedhub notifier", version="1", lifespan=lifespan)
    app.add_middleware(RequestMetrics, app_name="notifier")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False, response_model=None)
    async def readyz() -> dict[str, str] | JSONResponse:
        """Readiness: the database answers and the bus is connected."""
        rt = state.get("runtime")
        if rt is None:
            return JSONResponse({"error": "NotReady", "detail": "notifier not started"}, status_code=503)
        try:
            async with rt.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            detail = f"database unreachable: {type(exc).__name__}: {exc}"
            return JSONResponse({"error": "NotReady", "detail": detail}, status_code=503)
        if (problem := rt.bus.problem()) is not None:
            return JSONResponse({"error": "NotReady", "detail": problem}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", include_in_schema=False, response_class=Response)
    async def metrics() -> Response:
        """This process's metrics in the Prometheus text format."""
        return metrics_response()

    return app


def running(app: FastAPI) -> Notifier | None:
    """The notifier that `create_app`'s lifespan started (`app.state.notifier`); None before."""
    notifier: Notifier | None = getattr(app.state, "notifier", None)
    return notifier


def main() -> None:
    """Run the notifier standalone with uvicorn (settings from `FEDHUB_*` environment variables)."""
    settings = NotifierSettings()
    configure_logging(settings.log_level, settings.log_format)
    collect_less_often()
    app = create_app(settings)

    def streams() -> EventStream | None:
        notifier = running(app)
        return None if notifier is None else notifier.stream

    def end_streams() -> None:
        notifier = running(app)
        if notifier is not None:
            notifier.end_streams()

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        http=stream_first(streams) if settings.socket_streams else "auto",
    )
    asyncio.run(StreamEndingServer(config, end_streams).serve())


if __name__ == "__main__":
    main()
