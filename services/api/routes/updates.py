"""Client reports: model updates and test metrics, each accepted once per client and round."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from fastapi import APIRouter, Request, Response, status

from services.api import service
from services.api.deps import client_call
from services.api.schemas import (
    JSON,
    MSGPACK,
    ErrorOut,
    MetricsAccepted,
    PayloadFormat,
    UpdateAccepted,
    payload_format,
    read_json_object,
    read_tensor_document,
)
from services.api.uploads import request_chunks
from shared.codec import TensorDocumentReader
from shared.http_metrics import LabelledRoute
from shared.http_params import uuid_param

router = APIRouter(prefix="/v1/trainings/{training_id}", tags=["updates"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 403, 404, 409, 413, 415, 422)
}
_UPDATE_BODY = {
    "requestBody": {
        "required": True,
        "description": '`{"tensors": {...}, "round": int, "num_examples": int, "metrics"?: {str: number}}`',
        "content": {
            MSGPACK: {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object"}},
        },
    }
}


# The two routes take a round's every report, so they skip FastAPI's per-request dependency solving
# (`deps.client_call`) and response validation (they build their answer); the bearer scheme is named
# for the OpenAPI document by hand.
_BEARER: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


@router.post(
    "/updates",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={**_UPDATE_BODY, **_BEARER},
    response_model=UpdateAccepted,
    responses={200: {"model": UpdateAccepted, "description": "a repeat: the first update"}, **_ERRORS},
)
async def upload_update(training_id: UUID, request: Request) -> Response:
    """Upload this client's model update for the open round (201), or learn the first one's id (200)."""
    async with client_call(request) as call:
        fmt = payload_format(request.headers.get("content-type"))
        uow, cache, client_id = call.uow, call.cache, call.client.id
        body_size = _content_length(request)
        streamed = fmt is PayloadFormat.MSGPACK and (
            body_size is None or body_size > service.WHOLE_UPLOAD_BYTES
        )
        # A body read whole names its round before anything is checked against the training, so
        # the training's last view may answer (`open_or_fresh`); a streamed one is checked as it arrives.
        training = await service.participant_training(uow, cache, training_id, client_id, fresh=streamed)
        limit = call.settings.max_upload_bytes
        if streamed:
            reader = TensorDocumentReader(request_chunks(request, limit))
            receipt = await service.receive_streamed_update(
                uow, call.blobs, cache, call.reports, training, client_id, reader, body_size
            )
        else:
            doc = await read_tensor_document(request, fmt, limit)
            receipt = await service.receive_update(
                uow, call.blobs, cache, call.reports, training, client_id, doc
            )
    answer = UpdateAccepted(update_id=receipt.update_id, round=receipt.round, duplicate=receipt.duplicate)
    return _answer(answer, duplicate=receipt.duplicate)


_REPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": '`{"round": int, "num_examples": int, "metrics": {str: number}}`',
        "content": {JSON: {"schema": {"type": "object"}}},
    }
}
REPORT_BYTES = 1024 * 1024
"""A test report is a few numbers: its body may be this large at most."""


@router.post(
    "/test-metrics",
    status_code=status.HTTP_201_CREATED,
    openapi_extra={**_REPORT_BODY, **_BEARER},
    response_model=MetricsAccepted,
    responses={200: {"model": MetricsAccepted, "description": "a repeat"}, **_ERRORS},
)
async def report_test_metrics(training_id: UUID, request: Request) -> Response:
    """Report this client's evaluation of the round's model while the round is testing."""
    async with client_call(request) as call:
        # Read here, after the caller is known: an unauthenticated request is refused (401) whatever
        # its body holds, as it was while FastAPI solved the caller before validating the body.
        report = await read_json_object(request, REPORT_BYTES)
        receipt = await service.receive_test_metrics(
            call.uow, call.cache, call.reports, training_id, call.client.id, report
        )
    return _answer(
        MetricsAccepted(round=receipt.round, duplicate=receipt.duplicate), duplicate=receipt.duplicate
    )


def _answer(body: UpdateAccepted | MetricsAccepted, *, duplicate: bool) -> Response:
    """201 for a report recorded now, 200 for a repeat (the first one's answer)."""
    return Response(
        body.model_dump_json(),
        status_code=status.HTTP_200_OK if duplicate else status.HTTP_201_CREATED,
        media_type="application/json",
    )


def _content_length(request: Request) -> int | None:
    """The body's declared length (None when chunked or not a number: the body limit still holds)."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


Report = Callable[[UUID, Request], Awaitable[Response]]


class DirectRoute(LabelledRoute):
    """One of the report routes served without FastAPI's per-request machinery.

    FastAPI wraps each request to a route in three exit stacks, solves its parameters and calls the
    endpoint through its dependency runner; for the two routes that take every round's reports
    (one request per client and round) that was about a sixth of the API's CPU per upload
    (`bench/api_cpu.py`). A `DirectRoute`, put before the routers (`direct_routes`), matches the
    same path and method and calls the same endpoint with the path's training id, checked as FastAPI
    checks it (a malformed one: the same 422). The FastAPI route stays registered for the OpenAPI
    document, and behind this one serves nothing. Errors go through the app's exception handlers
    as before; the route's template labels its request metrics (`scope["route"]`).
    """

    def __init__(self, path: str, endpoint: Report) -> None:
        async def call(request: Request) -> Response:
            return await endpoint(_training_id(request), request)

        super().__init__(path, call, methods=["POST"], include_in_schema=False)
        self.call = call
        """The endpoint with its training id: what the app's `HotLane` calls."""


def _training_id(request: Request) -> UUID:
    """The path's training id, or FastAPI's own 422 for a path parameter that is not a UUID."""
    return uuid_param(request.path_params["training_id"], "path", "training_id")


def direct_routes() -> list[DirectRoute]:
    """The report routes as `DirectRoute`s, to be matched before every router (see `DirectRoute`)."""
    return [
        DirectRoute(f"{router.prefix}/updates", upload_update),
        DirectRoute(f"{router.prefix}/test-metrics", report_test_metrics),
    ]
