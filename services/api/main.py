"""Wiring of the HTTP API: `create_app` (embedded or standalone) and `main` (the standalone server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from http import HTTPStatus

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from services.api.cache import ApiCache
from services.api.connections import gated_connections
from services.api.gate import ConcurrencyGate, Slots
from services.api.lane import Api, HotLane
from services.api.routes import ROUTERS, models, updates
from services.api.settings import ApiSettings
from shared.auth import PrincipalCache, ensure_admin
from shared.errors import FedhubError, Unauthenticated
from shared.http_metrics import RequestMetrics
from shared.logging import configure_logging
from shared.runtime import Runtime, collect_less_often, freeze_startup_heap

log = structlog.get_logger(component="api")

_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


def create_app(settings: ApiSettings, runtime: Runtime | None = None) -> Api:
    """The API app: with `runtime` (embedded) it uses it and never closes it; else its lifespan opens one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            rt = runtime
            if rt is None:
                rt = await Runtime.open(settings, create_tables=settings.create_tables)
                stack.push_async_callback(rt.close)
            app.state.runtime = rt
            await _ensure_admin(rt, settings.admin_token)
            if runtime is None:
                freeze_startup_heap()
            log.info("api.started", embedded=runtime is not None)
            yield
            log.info("api.stopping")

    app = Api(
        title="fedhub",
        version="1",
        summary="Federated learning: rounds, aggregation and notifications over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.principals = PrincipalCache(settings.auth_cache_s)
    app.state.cache = ApiCache()
    if runtime is not None:
        app.state.runtime = runtime
    app.add_exception_handler(FedhubError, _fedhub_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    for router in ROUTERS:
        app.include_router(router)
    # The report routes' direct twins come first (`updates.DirectRoute`); the app's short lane
    # serves them (`services.api.lane`), the router when the lane cannot.
    direct = updates.direct_routes()
    app.router.routes[:0] = direct
    app.round_requests = (
        *((frozenset(route.methods or ()), route.path_regex) for route in direct),
        *((frozenset({"GET", "HEAD"}), compile_path(path)[0]) for path in models.DOWNLOADS),
    )
    slots = Slots(settings.max_concurrent_requests)
    app.add_middleware(ConcurrencyGate, slots=slots)
    app.add_middleware(RequestMetrics, app_name="api")
    if app.lane_allowed():
        app.lane = HotLane(direct, slots, app_name="api")
    return app


async def _ensure_admin(runtime: Runtime, token: str) -> None:
    try:
        async with runtime.uow() as uow:
            await ensure_admin(uow.session, token)
    except IntegrityError:
        # Another API process created it at the same moment; the retry finds that row.
        async with runtime.uow() as uow:
            await ensure_admin(uow.session, token)


def _error(status_code: int, name: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail}, status_code=status_code, headers=headers)


async def _fedhub_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FedhubError)  # registered for FedhubError only
    log.info(
        "request.refused",
        method=request.method,
        path=request.url.path,
        status=exc.status_code,
        error=exc.name,
        detail=exc.detail,
    )
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return _error(exc.status_code, exc.name, exc.detail, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # registered for RequestValidationError only
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in _LOCATIONS:
            loc = loc[1:]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    detail = "; ".join(parts) or "invalid request"
    log.info("request.refused", method=request.method, path=request.url.path, status=422, detail=detail)
    return _error(422, "ValidationError", detail)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # registered for HTTPException only
    name = "".join(word.capitalize() for word in HTTPStatus(exc.status_code).phrase.replace("-", " ").split())
    return _error(exc.status_code, name, str(exc.detail), dict(exc.headers) if exc.headers else None)


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    # A constraint caught a race the checks before it could not see (e.g. two starts at once).
    log.warning("request.conflict", method=request.method, path=request.url.path, error=str(exc.args[:1]))
    return _error(409, "Conflict", "the request conflicts with a concurrent change; read the state and retry")


def main() -> None:
    """Run the API as a standalone server (`fedhub api`), configured from `FEDHUB_*` variables."""
    import uvicorn
    from pydantic import ValidationError

    try:
        settings = ApiSettings()
    except ValidationError as exc:
        raise SystemExit(f"fedhub api: invalid settings (is FEDHUB_ADMIN_TOKEN set?)\n{exc}") from exc
    configure_logging(settings.log_level, settings.log_format)
    collect_less_often()
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_keep_alive=settings.idle_connection_s,
        http=http_protocol(settings, app),
    )


def http_protocol(settings: ApiSettings, app: Api) -> type[asyncio.Protocol]:
    """The `http=` protocol class of a uvicorn server serving `app`."""
    if settings.gate_at_socket:
        return gated_connections(
            settings.max_concurrent_requests, settings.max_concurrent_other_requests, app.is_round_request
        )
    return AutoHTTPProtocol
