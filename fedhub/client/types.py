"""The SDK's small typed answers and the shapes of the user's training callbacks."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias
from uuid import UUID

from fedhub.client.sse import ServerSentEvent

if TYPE_CHECKING:
    import torch

FitResult: TypeAlias = tuple[dict[str, "torch.Tensor"], int, dict[str, float]]
"""(new weights, number of training examples, train metrics)."""

FitFn: TypeAlias = Callable[
    [dict[str, "torch.Tensor"], dict[str, Any]], FitResult | Coroutine[Any, Any, FitResult]
]
"""(global weights, config) -> (new weights, number of training examples, train metrics).

A plain function runs in a worker thread (training blocks); an `async def` one is awaited on the
client's event loop, for work that is asynchronous already or too small for a thread hop (a
simulation of many clients in one process)."""

EvaluateResult: TypeAlias = tuple[int, dict[str, float]]
"""(number of test examples, test metrics)."""

EvaluateFn: TypeAlias = Callable[
    [dict[str, "torch.Tensor"], dict[str, Any]], EvaluateResult | Coroutine[Any, Any, EvaluateResult]
]
"""(global weights, config) -> (number of test examples, test metrics); run as `FitFn` is."""

EventHook: TypeAlias = Callable[[str, dict[str, Any]], None]
"""Called with ("uploaded" | "tested" | "finished", details) as a client makes progress."""


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification as `GET /v1/events` delivers it; `seq` is the stream's event id."""

    seq: int | None
    event_id: UUID | None
    notification_type: str
    training_id: UUID
    body: dict[str, Any] = field(default_factory=dict)
    timestamp: datetime | None = None

    @property
    def round(self) -> int | None:
        """The round the notification is about, when it names one."""
        value = self.body.get("round")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def global_model_id(self) -> UUID | None:
        """The global model to train from or to test, when the notification names one."""
        value = self.body.get("global_model_uuid")
        try:
            return UUID(str(value)) if value is not None else None
        except ValueError:
            return None


def parse_notification(event: ServerSentEvent) -> Notification:
    """Build a `Notification` from a server-sent event; ValueError when its data is not one."""
    try:
        raw = json.loads(event.data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"event data is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("event data is not a JSON object")
    kind = raw.get("notification_type") or event.event
    if not isinstance(kind, str) or not kind:
        raise ValueError("event names no notification_type")
    try:
        training_id = UUID(str(raw["training_uuid"]))
    except (KeyError, ValueError) as exc:
        raise ValueError("event names no valid training_uuid") from exc
    body = raw.get("body")
    return Notification(
        seq=int(event.id) if event.id.isascii() and event.id.isdigit() else None,
        event_id=_uuid_or_none(raw.get("event_id")),
        notification_type=kind,
        training_id=training_id,
        body=body if isinstance(body, dict) else {},
        timestamp=_datetime_or_none(raw.get("timestamp")),
    )


def _uuid_or_none(value: object) -> UUID | None:
    try:
        return UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _datetime_or_none(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one `Client.run()` did: the rounds it trained and tested and how the training ended."""

    training_id: UUID
    state: str
    final_model_id: UUID | None
    rounds_trained: tuple[int, ...]
    rounds_tested: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Principal:
    """A principal as created by an actor; `token` is shown only once, at creation."""

    id: UUID
    name: str
    role: str
    token: str

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Principal:
        """Build from the API's JSON answer."""
        return cls(
            id=UUID(str(raw["id"])), name=str(raw["name"]), role=str(raw["role"]), token=str(raw["token"])
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A stored model's metadata; `spec` maps tensor names to `{"dtype", "shape"}`."""

    id: UUID
    name: str
    digest: str
    size_bytes: int
    spec: dict[str, Any]
    training_id: UUID | None = None
    round: int | None = None
    created_at: datetime | None = None
    record: dict[str, Any] | None = None
    """What the aggregation method recorded about the round that made the model."""
    num_members: int = 0
    """Ensemble members (`ActorClient.get_members`)."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelInfo:
        """Build from the API's JSON answer."""
        spec = raw.get("spec")
        round_ = raw.get("round")
        record = raw.get("record")
        return cls(
            id=UUID(str(raw["id"])),
            name=str(raw.get("name") or ""),
            digest=str(raw.get("digest") or ""),
            size_bytes=int(raw.get("size_bytes") or 0),
            spec=spec if isinstance(spec, dict) else {},
            training_id=_uuid_or_none(raw.get("training_id")),
            round=round_ if isinstance(round_, int) else None,
            created_at=_datetime_or_none(raw.get("created_at")),
            record=record if isinstance(record, dict) else None,
            num_members=int(raw.get("num_members") or 0),
        )
