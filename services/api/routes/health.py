"""Liveness and readiness probes and the metrics (no authentication)."""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from services.api.deps import RuntimeDep
from services.api.schemas import Health
from shared.http_metrics import metrics_response

router = APIRouter(tags=["health"])
log = structlog.get_logger(component="api")

_READY_TIMEOUT_S = 5.0


@router.get("/healthz", response_model_exclude_none=True)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Health}}
)
async def readyz(runtime: RuntimeDep) -> Health | JSONResponse:
    """Readiness: the database answers `SELECT 1` and the bus is connected (the outbox relay needs it)."""
    try:
        async with asyncio.timeout(_READY_TIMEOUT_S), runtime.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to reach the database means "not ready"
        detail = f"database unreachable ({type(exc).__name__}: {exc})"
        log.warning("api.not_ready", detail=detail)
        return JSONResponse(Health(status="unavailable", detail=detail).model_dump(), status_code=503)
    if (problem := runtime.bus.problem()) is not None:
        log.warning("api.not_ready", detail=problem)
        return JSONResponse(Health(status="unavailable", detail=problem).model_dump(), status_code=503)
    return Health(status="ok")


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics() -> Response:
    """This process's metrics in the Prometheus text format (request durations, fan-out, triggers)."""
    return metrics_response()
