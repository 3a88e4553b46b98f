"""The report routes' short lane: the requests of a round's every client skip the app's stack.

Each upload and test report (one request per client and round) passed through about twenty ASGI
layers before its endpoint ran: FastAPI's and Starlette's entry points, the server-error, telemetry,
body-limit, metrics, gate, exception and exit-stack middleware, the router. Every time the request's
task resumed (its body read, its blob written, its group of reports committed) the resumption went
down through each of those frames again; at 1,000 clients that was about a fifth of the embedded
server's CPU (a profile of B 1,000, README "Round speed").

`Api` (the app's class, a `FastAPI`) hands a request that one of the `DirectRoute`s fully matches
(path and method) to its `HotLane`, which does in one frame what those layers do for it: the
request's metrics under its route template, a turn at the same `Slots` as every other gated
request, the endpoint, the app's own exception handlers for what it raises (the same answers as
through the stack), a 500 for anything else (re-raised for the server to log, as Starlette's
server-error middleware does). Everything else, a report route with a wrong method included
(405), goes through the full stack.

The lane is left out (every request takes the stack) for an app in debug mode, with a handler for
500 / `Exception`, a body size limit, or a `root_path`, which the stack alone knows how to apply.
FastAPI's own OpenTelemetry instrumentation, when a process configures a provider, sees the
report routes no more; fedhub's metrics are its Prometheus ones (`GET /metrics`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from services.api.gate import Slots
from services.api.routes.updates import DirectRoute
from shared.http_metrics import HTTP_REQUEST_SECONDS


class HotLane:
    """Serves the requests its `routes` fully match, one of `slots` each (see the module doc)."""

    def __init__(self, routes: Sequence[DirectRoute], slots: Slots, app_name: str) -> None:
        self._routes = tuple(routes)
        self._slots = slots
        self._app_name = app_name

    def match(self, scope: Scope) -> bool:
        """Whether a route of the lane fully matches this HTTP request; if so, the scope now holds
        what the router would have put there (path parameters, endpoint, route)."""
        for route in self._routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                return True
        return False

    async def serve(self, app: FastAPI, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request `match` took, as the full stack would."""
        started = time.perf_counter()
        scope["app"] = app
        scope["router"] = app.router
        route: DirectRoute = scope["route"]
        status = 500
        await self._slots.acquire()
        try:
            request = Request(scope, receive, send)
            try:
                response = await route.call(request)
            except Exception as exc:
                response = await _handled(app, request, exc, send)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            self._slots.release()
            HTTP_REQUEST_SECONDS.observe(
                time.perf_counter() - started,
                app=self._app_name,
                method=scope["method"],
                route=route.path,
                status=status,
            )


async def _handled(app: FastAPI, request: Request, exc: Exception, send: Send) -> Response:
    """The app's exception handler's answer to `exc` (status handlers first for an HTTP error);
    without one, a plain 500 is sent and `exc` raised again (as Starlette's stack does)."""
    handlers: dict[Any, Any] = app.exception_handlers
    handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
    if handler is None:
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        await PlainTextResponse("Internal Server Error", status_code=500)(
            request.scope, request.receive, send
        )
        raise exc
    response: Response = await handler(request, exc)
    return response


class Api(FastAPI):
    """The API's app: a `FastAPI` whose report routes take the `HotLane` when it has one."""

    lane: HotLane | None = None
    round_requests: tuple[tuple[frozenset[str], re.Pattern[str]], ...] = ()
    """(methods, path pattern) of every client's requests in every round: its reports
    (`updates.direct_routes`, lane or not) and its model downloads (`models.DOWNLOADS`)."""

    def is_round_request(self, method: str, path: str) -> bool:
        """Whether a request is one of the clients' round requests (the socket gate's question)."""
        return any(method in methods and pattern.match(path) for methods, pattern in self.round_requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # uvicorn keeps a kept-alive connection's last scope until its next request: what the
            # stack adds to it (FastAPI's exit stacks, the route, the endpoint) would stay with
            # every idle connection (~3 KiB of 11.7). The stack gets a copy that ends with it.
            scope = dict(scope)
            lane = self.lane
            if lane is not None and lane.match(scope):
                await lane.serve(self, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def lane_allowed(self) -> bool:
        """Whether the lane serves exactly as the stack would (see the module doc)."""
        handlers = self.exception_handlers
        body_limit = getattr(self, "max_body_size", None)  # FastAPI 0.160 and later
        return not (
            self.debug or self.root_path or body_limit is not None or 500 in handlers or Exception in handlers
        )
