"""The standalone app: opens its own runtime, serves health probes and the notifier's routes."""

from __future__ import annotations

import httpx

from services.notifier.service import create_app
from shared.metrics import parse_exposition, total
from tests.notifier.conftest import serve


async def test_standalone_app_opens_its_runtime(settings):
    """`create_app(settings)` alone: /healthz, /readyz, /metrics and an authenticated route answer."""
    app = create_app(settings)
    async with (
        serve(app, before_exit=lambda: app.state.notifier.end_streams()) as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
        events = await http.get("/v1/events")
        metrics = await http.get("/metrics")
    assert health.json() == {"status": "ok"}
    assert metrics.status_code == 200
    refused = {"app": "notifier", "method": "GET", "route": "/v1/events", "status": "401"}
    assert total(parse_exposition(metrics.text), "fedhub_http_request_duration_seconds_count", **refused) >= 1
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert events.status_code == 401
    assert events.json()["error"] == "Unauthenticated"


async def test_openapi_lists_the_notifier_routes(runtime, settings):
    """An app including the router still builds its OpenAPI document, with the stream's media type."""
    from fastapi import FastAPI

    from services.notifier.service import Notifier

    app = FastAPI()
    app.include_router(Notifier(settings, runtime).router)
    schema = app.openapi()
    assert {"/v1/events", "/v1/webhook"} <= set(schema["paths"])
    assert set(schema["paths"]["/v1/webhook"]) == {"put", "get", "delete"}
    assert "text/event-stream" in schema["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]
