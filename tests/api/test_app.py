"""The app's wiring: standalone lifespan, `main` without settings, the OpenAPI document, big payloads."""

from __future__ import annotations

import gc
from pathlib import Path
from uuid import UUID

import httpx
import numpy as np
import pytest

from services.api.main import create_app, main
from services.api.schemas import OFFLOAD_BYTES
from services.api.settings import ApiSettings
from shared.auth import admin_principal_id
from shared.codec import encode_tensors
from shared.db import models as db
from shared.metrics import parse_exposition, total
from shared.runtime import Runtime
from tests.api.conftest import api_settings
from tests.api.helpers import (
    ADMIN_TOKEN,
    MSGPACK,
    Fedhub,
    bearer,
    json_body,
    model_tensors,
    msgpack_body,
    record,
)


async def test_standalone_app_opens_and_closes_its_own_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a runtime the lifespan opens one (tables included when asked), seeds the admin, closes it."""
    settings = ApiSettings(
        admin_token=ADMIN_TOKEN,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'standalone.db'}",
        blob_path=tmp_path / "blobs",
        create_tables=True,
    )
    closed: list[Runtime] = []
    real_close = Runtime.close

    async def spy_close(self: Runtime) -> None:
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(Runtime, "close", spy_close)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            me = await http.get("/v1/me", headers=bearer(ADMIN_TOKEN))
            assert me.status_code == 200
            assert me.json()["role"] == "actor"
            assert (await http.get("/readyz")).status_code == 200
    assert closed == [runtime]


def test_main_refuses_to_start_without_an_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedhub api` without FEDHUB_ADMIN_TOKEN exits with a message naming it."""
    monkeypatch.delenv("FEDHUB_ADMIN_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="FEDHUB_ADMIN_TOKEN"):
        main()


async def test_openapi_document_builds(fedhub: Fedhub) -> None:
    """The OpenAPI document lists every route of the contract."""
    resp = await fedhub.http.get("/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    for path in (
        "/v1/principals",
        "/v1/me",
        "/v1/models",
        "/v1/models/{model_id}/weights",
        "/v1/trainings/{training_id}/start",
        "/v1/trainings/{training_id}/updates",
        "/v1/trainings/{training_id}/test-metrics",
        "/v1/trainings/{training_id}/rounds",
        "/healthz",
        "/readyz",
    ):
        assert path in paths


async def test_payloads_above_the_offload_threshold_round_trip(fedhub: Fedhub) -> None:
    """A model and an update larger than the threshold (decoded off the loop) are stored exactly."""
    big = np.linspace(-1, 1, OFFLOAD_BYTES // 2, dtype=np.float32)  # 2 MiB
    tensors = {"big": record("big", big), "b": record("b", np.ones(2, np.float32))}
    resp = await fedhub.http.post(
        "/v1/models",
        content=json_body(tensors),
        headers={**fedhub.admin.headers, "Content-Type": "application/json"},
    )
    assert resp.status_code == 201, resp.text
    model = resp.json()
    weights = await fedhub.http.get(f"/v1/models/{model['id']}/weights", headers=fedhub.admin.headers)
    assert weights.content == encode_tensors(tensors.values())
    as_json = await fedhub.http.get(
        f"/v1/models/{model['id']}/weights", headers={**fedhub.admin.headers, "Accept": "application/json"}
    )
    assert as_json.json()["tensors"]["big"]["shape"] == [big.size]

    client = await fedhub.principal()
    training = await fedhub.create_training(model["id"], [client.id])
    await fedhub.set_round(training["id"])
    update = {"big": record("big", big * 2), "b": record("b", np.zeros(2, np.float32))}
    resp = await fedhub.http.post(
        f"/v1/trainings/{training['id']}/updates",
        content=msgpack_body(update, round=1, num_examples=100),
        headers={**client.headers, "Content-Type": MSGPACK},
    )
    assert resp.status_code == 201, resp.text
    update_id = resp.json()["update_id"]
    assert (fedhub.blob_root / "update" / update_id).read_bytes() == encode_tensors(update.values())
    assert await fedhub.count(db.ClientUpdate, id=UUID(update_id)) == 1
    assert len(await fedhub.announced_updates()) == 1


async def test_embedded_app_leaves_the_runtime_open(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a runtime given, the lifespan uses it and never closes it (its owner does)."""
    closed: list[Runtime] = []

    async def spy_close(self: Runtime) -> None:
        closed.append(self)

    monkeypatch.setattr(Runtime, "close", spy_close)
    app = create_app(api_settings(runtime), runtime)
    async with app.router.lifespan_context(app):
        assert app.state.runtime is runtime
    assert closed == []
    monkeypatch.undo()
    async with runtime.uow() as uow:  # still usable
        assert await uow.session.get(db.Principal, admin_principal_id(ADMIN_TOKEN)) is not None


async def test_metrics_count_real_requests_by_route_template(fedhub: Fedhub) -> None:
    """`GET /metrics` (no token) answers Prometheus text; each request counts under its route template."""
    route = "/v1/models/{model_id}/weights"

    def weights_count(text: str, status: str) -> float:
        labels = {"app": "api", "method": "GET", "route": route, "status": status}
        return total(parse_exposition(text), "fedhub_http_request_duration_seconds_count", **labels)

    first = await fedhub.http.get("/metrics")
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/plain; version=0.0.4")
    model = await fedhub.upload_model(model_tensors())
    concrete = f"/v1/models/{model['id']}/weights"
    for _ in range(3):
        assert (await fedhub.http.get(concrete, headers=fedhub.admin.headers)).is_success
    missing = await fedhub.http.get(f"/v1/models/{UUID(int=0)}/weights", headers=fedhub.admin.headers)
    assert missing.status_code == 404
    assert (await fedhub.http.get("/no/such/path")).status_code == 404
    second = (await fedhub.http.get("/metrics")).text
    assert weights_count(second, "200") - weights_count(first.text, "200") == 3
    assert weights_count(second, "404") - weights_count(first.text, "404") == 1
    samples = parse_exposition(second)
    unmatched = {"app": "api", "route": "unmatched", "status": "404"}
    assert total(samples, "fedhub_http_request_duration_seconds_count", **unmatched) >= 1
    assert not any(("route", concrete) in labels for _, labels in samples), "a concrete path as a label"


def test_main_keeps_idle_connections_open_longer_than_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fedhub api` passes FEDHUB_IDLE_CONNECTION_S to uvicorn: clients waiting for the next round
    keep their connection (uvicorn alone closes it after 5 s, and the next request then fails)."""
    import uvicorn

    seen: dict[str, object] = {}
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("FEDHUB_IDLE_CONNECTION_S", "90")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    thresholds = gc.get_threshold()
    try:
        main()
    finally:
        gc.set_threshold(*thresholds)  # main() tunes the collector for a serving process
    assert seen["timeout_keep_alive"] == 90
    assert ApiSettings(admin_token="x").idle_connection_s > 60
