"""Request parameters checked as FastAPI checks them, for routes served below its machinery.

The report routes (`services.api.routes.updates.DirectRoute`) and the event stream
(`services.notifier.sse.EventStream`) read their parameters themselves; a malformed one must still
get the validation error FastAPI's solver would raise, so that the app maps it to the same 422.
"""

from __future__ import annotations

from uuid import UUID

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

_UUID: TypeAdapter[UUID] = TypeAdapter(UUID)


def uuid_param(raw: object, where: str, name: str) -> UUID:
    """`raw` as a UUID, or FastAPI's `RequestValidationError` located at (`where`, `name`), e.g.
    ("path", "training_id")."""
    try:
        return _UUID.validate_python(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": (where, name)} for error in exc.errors()]) from None
