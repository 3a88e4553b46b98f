"""HTTP request durations by route template, and the `GET /metrics` answer, for the ASGI apps.

`RequestMetrics` wraps an app (the API's, the notifier's): each request's wall time, from its
arrival to the last byte of its answer, goes to `fedhub_http_request_duration_seconds` labelled with
the app, the method, the route template (`/v1/models/{model_id}/weights`, never the concrete path,
so the series stay few) and the status. Event streams are left out: they last as long as a client
listens.
"""

from __future__ import annotations

import time

from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.metrics import CONTENT_TYPE, REGISTRY, Registry

HTTP_REQUEST_SECONDS = REGISTRY.histogram(
    "fedhub_http_request_duration_seconds",
    "Wall time of an HTTP request, from its arrival to the end of its answer (event streams excluded)",
    ("app", "method", "route", "status"),
)

UNMATCHED = "unmatched"
"""The route label of a request no route matched (a 404 for an unknown path)."""


class RequestMetrics:
    """Pure ASGI middleware recording each request's duration under its route template."""

    def __init__(self, app: ASGIApp, *, app_name: str) -> None:
        self.app = app
        self.app_name = app_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request; the route is known once the router has matched it (`scope["route"]`)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        streaming = False

        async def send_timed(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                        streaming = True
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            if not streaming:
                route = getattr(scope.get("route"), "path", None)
                HTTP_REQUEST_SECONDS.observe(
                    time.perf_counter() - started,
                    app=self.app_name,
                    method=scope.get("method", ""),
                    route=route if isinstance(route, str) else UNMATCHED,
                    status=status,
                )


class LabelledRoute(Route):
    """A Starlette route that names itself as the request's route (`scope["route"]`), as FastAPI's
    routes do, so that `RequestMetrics` labels its requests with its template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.FULL:
            child["route"] = self
        return match, child


def metrics_response(registry: Registry = REGISTRY) -> Response:
    """The registry in the Prometheus text format, as `GET /metrics` answers it."""
    return Response(registry.exposition(), media_type=CONTENT_TYPE)
