"""Request dependencies as `Annotated` aliases: the unit of work, the caller and its role, the blob store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.cache import ApiCache
from services.api.reports import Reports
from services.api.service import new_reports
from services.api.settings import ApiSettings
from shared.auth import Caller, PrincipalCache, bearer_token, caller_for_token
from shared.blobs import BlobStore
from shared.db.uow import UnitOfWork
from shared.enums import Role
from shared.errors import Forbidden
from shared.runtime import Runtime

# Declared for the OpenAPI document only; the header is parsed by `shared.auth` so that every
# failure is a named `Unauthenticated` error.
_bearer = HTTPBearer(auto_error=False, description="the principal's token: `Authorization: Bearer <token>`")


# The trivial dependencies are `async` only so that FastAPI calls them inline, not in its thread pool.
async def get_runtime(request: Request) -> Runtime:
    """The process's runtime, set by `create_app` (embedded) or by the app's lifespan."""
    return _runtime(request)


def _runtime(request: Request) -> Runtime:
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise RuntimeError("the API has no runtime: run the app's lifespan or pass one to create_app")
    return cast(Runtime, runtime)


async def get_settings(request: Request) -> ApiSettings:
    """The settings the app was created with."""
    return cast(ApiSettings, request.app.state.settings)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]


async def unit_of_work(runtime: RuntimeDep) -> AsyncIterator[UnitOfWork]:
    """One unit of work per request: committed when the endpoint returns, before the answer is sent."""
    async with runtime.uow() as uow:
        yield uow


# scope="function": the commit happens before the response goes out, so a failed commit becomes the
# answer instead of following a success the client already received.
UowDep = Annotated[UnitOfWork, Depends(unit_of_work, scope="function")]


async def current_principal(
    request: Request,
    uow: UowDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Caller:
    """The caller, from the app's principal cache or by one indexed query on its token's hash;
    `Unauthenticated` without a valid token."""
    return await _caller(request, uow)


async def _caller(request: Request, uow: UnitOfWork) -> Caller:
    token = bearer_token(request.headers.get("authorization"))
    cache: PrincipalCache | None = getattr(request.app.state, "principals", None)
    return await caller_for_token(uow.session, token, cache)


CurrentPrincipal = Annotated[Caller, Depends(current_principal)]


def _require(principal: Caller, role: Role) -> Caller:
    if principal.role != role:
        raise Forbidden(
            f"this needs the {role.value} role; principal {principal.id} has the {principal.role.value} role"
        )
    return principal


async def current_actor(principal: CurrentPrincipal) -> Caller:
    """The caller, who must be an actor."""
    return _require(principal, Role.ACTOR)


async def current_client(principal: CurrentPrincipal) -> Caller:
    """The caller, who must be a client."""
    return _require(principal, Role.CLIENT)


async def get_blobs(runtime: RuntimeDep) -> BlobStore:
    """The blob store of the runtime."""
    return runtime.blobs


async def get_cache(request: Request) -> ApiCache:
    """The app's caches of immutable rows and blobs."""
    return cast(ApiCache, request.app.state.cache)


async def get_reports(request: Request, runtime: RuntimeDep) -> Reports:
    """The app's report groups (`services.api.reports`), made on first use over the runtime's units
    of work."""
    return _reports(request, runtime)


def _reports(request: Request, runtime: Runtime) -> Reports:
    reports: Reports | None = getattr(request.app.state, "reports", None)
    if reports is None:
        reports = request.app.state.reports = new_reports(runtime.uow)
    return reports


@dataclass(frozen=True, slots=True)
class ClientCall:
    """What a client's report (an update, test metrics) works with: the calling client, the
    request's unit of work and the app's parts."""

    uow: UnitOfWork
    client: Caller
    blobs: BlobStore
    settings: ApiSettings
    cache: ApiCache
    reports: Reports


@asynccontextmanager
async def client_call(request: Request) -> AsyncIterator[ClientCall]:
    """The dependencies of the report routes, made in one step instead of by FastAPI's solver.

    The same as `UowDep` + `CurrentClient` + the app's parts (the unit of work commits when the
    block ends, before the answer is sent; `Unauthenticated` / `Forbidden` before the body is read),
    for the routes that take most requests: FastAPI solves a route's dependency graph per request
    (13 nodes for an upload), which cost about as much CPU as the upload's own work."""
    runtime = _runtime(request)
    state = request.app.state
    async with runtime.uow() as uow:
        client = _require(await _caller(request, uow), Role.CLIENT)
        yield ClientCall(
            uow=uow,
            client=client,
            blobs=runtime.blobs,
            settings=cast(ApiSettings, state.settings),
            cache=cast(ApiCache, state.cache),
            reports=_reports(request, runtime),
        )


CacheDep = Annotated[ApiCache, Depends(get_cache)]
ReportsDep = Annotated[Reports, Depends(get_reports)]
CurrentActor = Annotated[Caller, Depends(current_actor)]
CurrentClient = Annotated[Caller, Depends(current_client)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
