"""Principals, authentication, role checks and the health probes."""

from __future__ import annotations

from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from services.api.main import create_app
from shared.auth import hash_token
from shared.db.models import Principal as PrincipalRow
from tests.api.conftest import api_settings
from tests.api.helpers import ADMIN_TOKEN, Fedhub, bearer


async def test_actor_creates_principals_whose_tokens_authenticate(fedhub: Fedhub) -> None:
    """A created client's token is answered once, stored only as its hash, and identifies it on /v1/me."""
    resp = await fedhub.http.post(
        "/v1/principals", json={"name": "  site-1 ", "role": "client"}, headers=fedhub.admin.headers
    )
    assert resp.status_code == 201
    created = resp.json()
    assert created["name"] == "site-1"
    assert created["role"] == "client"
    token = created["token"]

    me = await fedhub.http.get("/v1/me", headers=bearer(token))
    assert me.status_code == 200
    assert me.json() == {"id": created["id"], "name": "site-1", "role": "client"}

    async with fedhub.runtime.uow() as uow:
        row = (await uow.session.scalars(select(PrincipalRow).where(PrincipalRow.name == "site-1"))).one()
    assert row.token_hash == hash_token(token)
    assert token not in (row.token_hash, row.name)


async def test_admin_is_the_bootstrap_actor(fedhub: Fedhub) -> None:
    """The configured admin token authenticates as an actor from the first request on."""
    resp = await fedhub.http.get("/v1/me", headers=bearer(ADMIN_TOKEN))
    assert resp.status_code == 200
    assert resp.json()["role"] == "actor"
    assert resp.json()["id"] == fedhub.admin.id


async def test_missing_or_unknown_token_is_401(fedhub: Fedhub) -> None:
    """No header, a non-bearer scheme or an unknown token are each 401 Unauthenticated."""
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("fh_nope")):
        resp = await fedhub.http.get("/v1/me", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.json()["error"] == "Unauthenticated"
        assert resp.headers["www-authenticate"] == "Bearer"


async def test_client_may_not_create_principals(fedhub: Fedhub) -> None:
    """The principals route needs the actor role and says so."""
    client = await fedhub.principal()
    resp = await fedhub.http.post(
        "/v1/principals", json={"name": "x", "role": "client"}, headers=client.headers
    )
    assert resp.status_code == 403
    assert resp.json()["error"] == "Forbidden"
    assert "actor role" in resp.json()["detail"]


async def test_invalid_principal_body_is_a_named_validation_error(fedhub: Fedhub) -> None:
    """An unknown role is 422 ValidationError naming the field; nothing is created."""
    before = await fedhub.count(PrincipalRow)
    resp = await fedhub.http.post(
        "/v1/principals", json={"name": "x", "role": "root"}, headers=fedhub.admin.headers
    )
    assert resp.status_code == 422
    assert resp.json()["error"] == "ValidationError"
    assert resp.json()["detail"].startswith("role: ")
    assert await fedhub.count(PrincipalRow) == before


async def test_unknown_route_answers_in_the_error_format(fedhub: Fedhub) -> None:
    """Even the framework's own 404 carries `error` and `detail`."""
    resp = await fedhub.http.get("/v1/nothing-here", headers=fedhub.admin.headers)
    assert resp.status_code == 404
    assert resp.json() == {"error": "NotFound", "detail": "Not Found"}


async def test_health_probes(fedhub: Fedhub) -> None:
    """Liveness and readiness answer without a token while the database is reachable."""
    assert (await fedhub.http.get("/healthz")).json() == {"status": "ok"}
    ready = await fedhub.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"


async def test_readyz_is_503_when_the_database_is_unreachable(fedhub: Fedhub, tmp_path: Path) -> None:
    """A database that cannot be opened makes the API not ready."""
    # A directory is not a database file: every connection attempt fails.
    broken = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}")
    runtime = fedhub.runtime
    try:
        app = create_app(api_settings(runtime), runtime)
        app.state.runtime = type(runtime)(
            settings=runtime.settings,
            engine=broken,
            uow=runtime.uow,
            blobs=runtime.blobs,
            bus=runtime.bus,
            relay=runtime.relay,
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            resp = await http.get("/readyz")
    finally:
        await broken.dispose()
    assert resp.status_code == 503
    assert resp.json()["status"] == "unavailable"
    assert "database unreachable" in resp.json()["detail"]
