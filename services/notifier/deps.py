"""HTTP plumbing the notifier's routes share: error mapping that needs no app, and authentication.

The routes are included into whichever app runs them (their own in standalone mode, the API's in
embedded mode), so they cannot rely on that app's exception handlers: the route class maps errors.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from uuid import UUID

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from shared.auth import PrincipalCache, caller_for_token
from shared.db.uow import UnitOfWorkFactory
from shared.errors import FedhubError, Unauthenticated


class NotifierStopping(FedhubError):
    """The notifier is shutting down and takes no new event streams."""

    status_code = 503


def error_response(status_code: int, name: str, detail: str) -> JSONResponse:
    """The API's error shape: `{"error": "<ErrorName>", "detail": "<what happened>"}`."""
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    return JSONResponse({"error": name, "detail": detail}, status_code=status_code, headers=headers)


def error_answer(exc: FedhubError | RequestValidationError) -> JSONResponse:
    """The error shape's answer to a refusal: the error's own status, or 422 for invalid parameters."""
    if isinstance(exc, RequestValidationError):
        return error_response(422, "ValidationError", describe(exc.errors()))
    return error_response(exc.status_code, exc.name, exc.detail)


def describe(errors: Sequence[Any]) -> str:
    """Validation errors as one line: `<where>: <what>; ...`."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class ErrorMappingRoute(APIRoute):
    """A route that answers `FedhubError` and request validation failures in the API's error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler so errors become `{"error", "detail"}` responses."""
        handler = super().get_route_handler()

        async def mapped(request: Request) -> Response:
            try:
                return await handler(request)
            except (FedhubError, RequestValidationError) as exc:
                return error_answer(exc)

        return mapped


async def authenticate(uow: UnitOfWorkFactory, token: str, cache: PrincipalCache | None = None) -> UUID:
    """The id of the principal `token` belongs to (from `cache` when it knows), or `Unauthenticated`."""
    if not token:
        raise Unauthenticated("empty bearer token")
    async with uow() as unit:
        caller = await caller_for_token(unit.session, token, cache)
        return caller.id
