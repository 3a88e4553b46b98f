"""What travels on the wire: JSON bodies and answers, and tensor payloads in msgpack or JSON+base64."""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints
from starlette.requests import Request

from services.api.errors import PayloadTooLarge, UnsupportedMediaType, ValidationError
from shared.codec import TensorRecord, decode_document, decode_tensors, parse_tensor_map
from shared.enums import Role, RoundPhase, TrainingState
from shared.errors import MalformedPayload

OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are decoded, checked and encoded off the event loop."""

MSGPACK = "application/msgpack"
JSON = "application/json"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack"})

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
"""A finite metric value; strict so that `true` is not taken for 1."""


class _Body(BaseModel):
    # Field names such as `model_id` are part of the contract, not pydantic's namespace.
    model_config = ConfigDict(protected_namespaces=())


# --- principals ---------------------------------------------------------------------------------


class PrincipalCreate(_Body):
    """`POST /v1/principals` body."""

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    role: Role


class PrincipalOut(_Body):
    """A principal as the API shows it (never its token)."""

    id: UUID
    name: str
    role: Role


class PrincipalCreated(PrincipalOut):
    """A new principal with its bearer token, shown this once."""

    token: str


# --- models -------------------------------------------------------------------------------------


class TensorSpecOut(_Body):
    """One tensor of a model's signature."""

    dtype: str
    shape: list[int]


class ModelOut(_Body):
    """A stored model's metadata."""

    id: UUID
    name: str
    digest: str
    size_bytes: int
    spec: dict[str, TensorSpecOut]
    training_id: UUID | None
    round: int | None
    created_at: datetime
    record: dict[str, Any] | None = None
    """What the aggregation method recorded about the round that made this model."""
    num_members: int = 0
    """Ensemble members (`GET /v1/models/{id}/members`)."""


class MemberOut(_Body):
    """One member of an ensemble model."""

    index: int
    digest: str
    size_bytes: int
    update_id: UUID | None
    client_id: UUID | None


# --- trainings ----------------------------------------------------------------------------------


class TrainingCreate(_Body):
    """`POST /v1/trainings` body; the defaults are the seed's."""

    model_id: UUID
    clients: list[UUID] = Field(min_length=1)
    aggregation: str = "fedavg"
    """An `AggregationMethod` name; checked with the parameters in the service (a 422 naming them)."""
    aggregation_params: dict[str, Any] | None = None
    update_kind: str = "weights"
    exclude_vars: str | None = None
    max_update_norm: float | None = None
    rounds: Annotated[StrictInt, Field(ge=1)]
    min_clients: Annotated[StrictInt, Field(ge=1)] | None = None
    round_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 600.0
    skip_model_tests: StrictBool = False
    model_test_after_each_round: StrictBool = True
    delete_local_models_after_aggregation: StrictBool = True


class TrainingOut(_Body):
    """A training with who takes part and who has reported for the current round.

    For a participant (not the owner) the three lists hold that participant alone, when it belongs
    there: clients learn nothing of each other."""

    id: UUID
    state: TrainingState
    phase: RoundPhase | None
    round: int
    rounds: int
    aggregation: str
    aggregation_params: dict[str, Any]
    update_kind: str
    exclude_vars: str | None
    max_update_norm: float | None
    client_config: dict[str, Any]
    """What clients receive with each round: update kind, excluded tensors, FedProx's mu."""
    min_clients: int
    round_timeout_s: float
    skip_model_tests: bool
    model_test_after_each_round: bool
    delete_local_models_after_aggregation: bool
    initial_model_id: UUID
    current_model_id: UUID
    participants: list[UUID]
    uploaded: list[UUID]
    tested: list[UUID]
    deadline_at: datetime | None
    failure_reason: str | None
    created_at: datetime


class RejectedOut(_Body):
    """An update the aggregator left out of its round, and why."""

    update_id: UUID
    client_id: UUID
    reason: str


class RoundOut(_Body):
    """One round's timeline, result and example-weighted mean metrics (of the aggregated updates)."""

    round: int
    started_at: datetime
    aggregated_at: datetime | None
    finished_at: datetime | None
    model_id: UUID | None
    num_updates: int | None
    num_examples: int | None
    train_metrics: dict[str, float]
    test_metrics: dict[str, float]
    rejected: list[RejectedOut] = Field(default_factory=list)


# --- updates and test metrics -------------------------------------------------------------------


class UpdateAccepted(_Body):
    """Answer to an update upload; `duplicate` when this client had already sent one for the round."""

    update_id: UUID
    round: int
    duplicate: bool


class MetricsReport(_Body):
    """`POST /v1/trainings/{id}/test-metrics` body: a client's evaluation of the round's model."""

    round: StrictInt
    num_examples: Annotated[StrictInt, Field(ge=0)]
    metrics: dict[str, Number] = Field(default_factory=dict)


class MetricsAccepted(_Body):
    """Answer to a test-metrics report."""

    round: int
    duplicate: bool


class Health(_Body):
    """Liveness or readiness."""

    status: Literal["ok", "unavailable"]
    detail: str | None = None


class ErrorOut(_Body):
    """Every 4xx/5xx body."""

    error: str
    detail: str


# --- tensor payloads ----------------------------------------------------------------------------


class PayloadFormat(enum.Enum):
    """How a tensor payload is encoded."""

    MSGPACK = MSGPACK
    JSON = JSON


def payload_format(content_type: str | None) -> PayloadFormat:
    """The format a `Content-Type` header names, or `UnsupportedMediaType`."""
    media = (content_type or "").partition(";")[0].strip().lower()
    if media in _MSGPACK_TYPES:
        return PayloadFormat.MSGPACK
    if media == JSON:
        return PayloadFormat.JSON
    raise UnsupportedMediaType(
        f"content type {media or '(none)'!r} is not accepted for tensor payloads; "
        f"send {MSGPACK} (or application/x-msgpack) or {JSON} with base64 data"
    )


def wants_json(accept: str | None) -> bool:
    """Whether an `Accept` header prefers JSON over msgpack (msgpack is the default)."""
    json_q = msgpack_q = 0.0
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == JSON:
            json_q = max(json_q, q)
        elif media in _MSGPACK_TYPES or media in ("*/*", "application/*"):
            msgpack_q = max(msgpack_q, q)
    return json_q > msgpack_q


@dataclass(frozen=True, slots=True)
class TensorDocument:
    """A decoded tensor-payload body: its plain fields, with the tensor map not yet checked."""

    fields: dict[str, Any]
    format: PayloadFormat
    size: int
    """Body size in bytes: decides whether the tensor work leaves the event loop."""

    def records(self) -> list[TensorRecord]:
        """Check the tensor map's structure and return its records (CPU work: offload big ones)."""
        raw = self.fields.get("tensors")
        if self.format is PayloadFormat.JSON:
            raw = _debase64(raw)
        return parse_tensor_map(raw)


def _debase64(raw: object) -> object:
    """A JSON tensor map with its base64 `data` strings turned into bytes."""
    if not isinstance(raw, dict):
        return raw
    out: dict[object, object] = {}
    for name, spec in raw.items():
        if isinstance(spec, dict) and "data" in spec:
            data = spec["data"]
            if not isinstance(data, str):
                raise MalformedPayload(f"tensor {name!r}: 'data' must be a base64 string in JSON")
            try:
                spec = {**spec, "data": base64.b64decode(data, validate=True)}
            except (binascii.Error, ValueError) as exc:
                raise MalformedPayload(f"tensor {name!r}: 'data' is not valid base64 ({exc})") from exc
        out[name] = spec
    return out


def _decode(body: bytearray, fmt: PayloadFormat) -> dict[str, Any]:
    if fmt is PayloadFormat.MSGPACK:
        return decode_document(memoryview(body))
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise MalformedPayload(f"body is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise MalformedPayload(f"body must be a JSON object, got {type(doc).__name__}")
    return doc


async def read_body(request: Request, limit: int) -> bytearray:
    """The whole request body, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    return body


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """A JSON object body of at most `limit` bytes; `ValidationError` (422) for anything else, as
    FastAPI's validation of a `dict` body answers."""
    body = await read_body(request, limit)
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise ValidationError(f"body: JSON decode error: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationError("body: Input should be a valid dictionary")
    return value


async def read_tensor_document(request: Request, fmt: PayloadFormat, limit: int) -> TensorDocument:
    """Read and decode a tensor-payload body (off the event loop when it is large)."""
    body = await read_body(request, limit)
    if len(body) > OFFLOAD_BYTES:
        fields = await asyncio.to_thread(_decode, body, fmt)
    else:
        fields = _decode(body, fmt)
    return TensorDocument(fields=fields, format=fmt, size=len(body))


def weights_as_json(blob: bytes) -> bytes:
    """A stored canonical tensor document rendered as JSON with base64 data."""
    tensors = {
        r.name: {"dtype": r.dtype, "shape": list(r.shape), "data": base64.b64encode(r.data).decode("ascii")}
        for r in decode_tensors(blob)
    }
    return json.dumps({"tensors": tensors}, separators=(",", ":")).encode()
