"""Fixtures: an embedded runtime on SQLite in tmp_path, the app with its lifespan, an HTTP client.

The app is driven through `httpx.ASGITransport`, which does not run ASGI lifespan events; the `app`
fixture therefore enters `app.router.lifespan_context(app)` itself, exactly as a server would at
start-up (it ensures the bootstrap admin), and leaves it at tear-down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from services.api.main import create_app
from services.api.settings import ApiSettings
from shared.auth import admin_principal_id
from shared.runtime import Runtime
from shared.settings import CommonSettings
from tests.api.helpers import ADMIN_TOKEN, Fedhub, Principal, RecordingBus, model_tensors


def api_settings(runtime: Runtime, **overrides: object) -> ApiSettings:
    """API settings over the test runtime's database and blob folder."""
    return ApiSettings(
        admin_token=ADMIN_TOKEN,
        database_url=runtime.settings.database_url,
        blob_path=runtime.settings.blob_path,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """An embedded runtime: SQLite in tmp_path, blobs in tmp_path/blobs, a spy on the in-memory bus.

    Every blob is a file here (`blob_row_max_bytes=0`), so that tests can see what an upload left;
    the embedded default keeps small blobs as rows (`TieredBlobStore`), which the blob contract
    tests, the streamed-upload tests and the end-to-end tests run."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        blob_row_max_bytes=0,
    )
    rt = await Runtime.open(settings, bus=RecordingBus(), create_tables=True)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def app(runtime: Runtime) -> AsyncIterator[FastAPI]:
    """The API in embedded mode, its lifespan entered (ASGITransport would not run it)."""
    application = create_app(api_settings(runtime), runtime)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the app in process."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fedhub.test") as c:
        yield c


@pytest.fixture
def fedhub(http: httpx.AsyncClient, runtime: Runtime) -> Fedhub:
    """The API plus its runtime, with the bootstrap admin."""
    return Fedhub(
        http=http, runtime=runtime, admin=Principal(str(admin_principal_id(ADMIN_TOKEN)), ADMIN_TOKEN)
    )


@dataclass
class World:
    """A training in round 1, COLLECTING, with two participants and one outsider client."""

    fedhub: Fedhub
    model: dict[str, object]
    training_id: str
    alice: Principal
    bob: Principal
    outsider: Principal


@pytest.fixture
async def world(fedhub: Fedhub) -> World:
    """Two participants, an outsider, a model and a training whose round 1 is collecting updates."""
    alice = await fedhub.principal(name="alice")
    bob = await fedhub.principal(name="bob")
    outsider = await fedhub.principal(name="mallory")
    model = await fedhub.upload_model(model_tensors(), name="tiny")
    training = await fedhub.create_training(str(model["id"]), [alice.id, bob.id])
    await fedhub.set_round(training["id"])
    return World(fedhub, model, training["id"], alice, bob, outsider)
