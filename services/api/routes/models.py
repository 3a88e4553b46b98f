"""Models: actors upload initial models; actors and participants read metadata and weights."""

from __future__ import annotations

from uuid import UUID

from fastapi import APIRouter, Request, Response, status

from services.api import service
from services.api.deps import BlobsDep, CacheDep, CurrentActor, CurrentPrincipal, SettingsDep, UowDep
from services.api.schemas import (
    JSON,
    MSGPACK,
    ErrorOut,
    MemberOut,
    ModelOut,
    PayloadFormat,
    TensorSpecOut,
    payload_format,
    read_tensor_document,
    wants_json,
    weights_as_json,
)
from services.api.uploads import request_chunks
from shared.codec import TensorDocumentReader
from shared.db.models import Model

router = APIRouter(prefix="/v1/models", tags=["models"])

_WEIGHTS = "/{model_id}/weights"
_MEMBER_WEIGHTS = "/{model_id}/members/{index}"
DOWNLOADS = frozenset({router.prefix + _WEIGHTS, router.prefix + _MEMBER_WEIGHTS})
"""The routes a client downloads a round's model by (the socket gate counts them with the reports)."""

_TENSOR_BODY = {
    "requestBody": {
        "required": True,
        "description": '`{"tensors": {name: {"dtype", "shape", "data"}}, "name"?}`; data raw (msgpack) '
        "or base64 (JSON)",
        "content": {
            MSGPACK: {"schema": {"type": "string", "format": "binary"}},
            JSON: {"schema": {"type": "object"}},
        },
    }
}


def model_out(model: Model, num_members: int = 0) -> ModelOut:
    """A model row as the API shows it."""
    return ModelOut(
        id=model.id,
        name=model.name,
        digest=model.digest,
        size_bytes=model.size_bytes,
        spec={
            name: TensorSpecOut(dtype=dtype, shape=list(shape)) for name, (dtype, shape) in model.spec.items()
        },
        training_id=model.training_id,
        round=model.round,
        created_at=model.created_at,
        record=model.record,
        num_members=num_members,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_TENSOR_BODY,
    responses={415: {"model": ErrorOut}, 422: {"model": ErrorOut}},
)
async def upload_model(
    request: Request, actor: CurrentActor, uow: UowDep, blobs: BlobsDep, settings: SettingsDep
) -> ModelOut:
    """Upload a model (msgpack or JSON+base64); it is checked and stored in its canonical encoding."""
    fmt = payload_format(request.headers.get("content-type"))
    if fmt is PayloadFormat.MSGPACK:
        reader = TensorDocumentReader(request_chunks(request, settings.max_upload_bytes))
        model = await service.upload_streamed_model(uow, blobs, actor.id, reader)
    else:
        doc = await read_tensor_document(request, fmt, settings.max_upload_bytes)
        model = await service.upload_model(uow, blobs, actor.id, doc)
    return model_out(model)


@router.get("/{model_id}")
async def get_model(model_id: UUID, principal: CurrentPrincipal, uow: UowDep, cache: CacheDep) -> ModelOut:
    """A model's metadata (and its round's record): any model for actors, their trainings' for clients."""
    model = await service.visible_model(uow.session, cache, model_id, principal)
    return model_out(model, await service.count_members(uow.session, model_id))


@router.get(
    _WEIGHTS,
    response_class=Response,
    responses={200: {"content": {MSGPACK: {}, JSON: {}}, "description": "the tensor payload"}},
)
async def get_weights(
    model_id: UUID,
    request: Request,
    principal: CurrentPrincipal,
    uow: UowDep,
    blobs: BlobsDep,
    cache: CacheDep,
) -> Response:
    """A model's tensors: the stored msgpack bytes as they are, or JSON+base64 when JSON is accepted."""
    blob = await service.model_weights(uow.session, blobs, cache, model_id, principal)
    return await _tensor_response(blob, request)


@router.get("/{model_id}/members", responses={404: {"model": ErrorOut}})
async def get_members(
    model_id: UUID, principal: CurrentPrincipal, uow: UowDep, cache: CacheDep
) -> list[MemberOut]:
    """An ensemble model's members in order (empty for other models)."""
    members = await service.model_members(uow.session, cache, model_id, principal)
    return [
        MemberOut(
            index=m.index,
            digest=m.digest,
            size_bytes=m.size_bytes,
            update_id=m.update_id,
            client_id=m.client_id,
        )
        for m in members
    ]


@router.get(
    _MEMBER_WEIGHTS,
    response_class=Response,
    responses={
        200: {"content": {MSGPACK: {}, JSON: {}}, "description": "the member's tensor payload"},
        404: {"model": ErrorOut},
    },
)
async def get_member_weights(
    model_id: UUID,
    index: int,
    request: Request,
    principal: CurrentPrincipal,
    uow: UowDep,
    blobs: BlobsDep,
    cache: CacheDep,
) -> Response:
    """One ensemble member's tensors, encoded as model downloads are."""
    blob = await service.member_weights(uow.session, blobs, cache, model_id, index, principal)
    return await _tensor_response(blob, request)


async def _tensor_response(blob: bytes, request: Request) -> Response:
    """The stored msgpack bytes as they are, or JSON+base64 when JSON is accepted."""
    if not wants_json(request.headers.get("accept")):
        return Response(blob, media_type=MSGPACK)
    body = await service.offload(len(blob), weights_as_json, blob)
    return Response(body, media_type=JSON)
