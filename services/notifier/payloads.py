"""What clients receive: the notification JSON, its compact encoding and its server-sent-event frame."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any
from uuid import UUID

from shared.events import NotificationIssued

KEEPALIVE = b": keepalive\n\n"
"""An SSE comment: clients ignore it, proxies see traffic and keep the connection open."""


@dataclass(frozen=True, slots=True)
class LiveNotification:
    """A stored notification as the hub fans it out: encoded once, shared by every stream."""

    seq: int
    training_id: UUID
    receivers: frozenset[UUID]
    frame: bytes
    notification_type: str = ""
    issued_at: float = 0.0
    """When the issuer created it (epoch seconds), for the fan-out metrics; 0 when unknown."""
    committed_at: float = 0.0
    """When the notifier's transaction storing it committed (epoch seconds); 0 when unknown."""


def notification_payload(message: NotificationIssued) -> dict[str, Any]:
    """The contract payload: `event_id`, `notification_type`, `training_uuid`, `body`, `timestamp`."""
    return {
        "event_id": str(message.event_id),
        "notification_type": str(message.notification_type),
        "training_uuid": str(message.training_id),
        "body": jsonable(message.body),
        "timestamp": message.issued_at.isoformat(),
    }


def jsonable(value: Any) -> Any:
    """`value` with UUIDs, datetimes and enums (what a decoded message may hold) as JSON scalars."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def dumps(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON: the SSE `data` line and the webhook body (never contains a raw newline)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sse_frame(seq: int, notification_type: str, data: bytes) -> bytes:
    """`id: <seq>\\nevent: <type>\\ndata: <json>\\n\\n`."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, notification_type.encode(), data)
