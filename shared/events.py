"""Every message that crosses the bus: one frozen dataclass per event or command.

Events are past tense and may have many consumers; commands are imperative and have exactly one.
Evolve a message only by adding fields with defaults; a breaking change is a new class and routing key.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from uuid import UUID


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class NotificationType(enum.StrEnum):
    """The notifications clients and actors receive; the seed's vocabulary."""

    TRAINING_START = "TRAINING_START"
    UPDATE_ROUND_START = "UPDATE_ROUND_START"
    MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
    TRAINING_FINISHED = "TRAINING_FINISHED"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every event and command; `routing_key` names it on the bus."""

    routing_key: ClassVar[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event(Message):
    """Something that happened; any number of consumers."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command(Message):
    """Something to do; exactly one consuming service."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateRef:
    """A client's accepted model update as an aggregation job sees it (claim-check: the blob key only)."""

    update_id: UUID
    client_id: UUID
    blob_key: str
    num_examples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTraining(Command):
    """An actor asked to start a training (INITIAL -> ONGOING); consumed by the orchestrator."""

    routing_key: ClassVar[str] = "training.start"
    training_id: UUID
    requested_by: UUID


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelTraining(Command):
    """An actor asked to cancel a training (INITIAL or ONGOING -> CANCELLED); consumed by the orchestrator."""

    routing_key: ClassVar[str] = "training.cancel"
    training_id: UUID
    requested_by: UUID


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedUpdate:
    """One client's update in an `UpdatesReceived`."""

    client_id: UUID
    update_id: UUID
    num_examples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdatesReceived(Event):
    """Clients' model updates for a round were validated, stored and recorded in one transaction.

    The API records the reports that arrive together in one transaction (`services/api/reports.py`)
    and announces each training round's share of them in one message: at 1,000 clients a round,
    a few dozen messages instead of a thousand, each counted by the orchestrator alike."""

    routing_key: ClassVar[str] = "updates.received"
    training_id: UUID
    round: int
    updates: tuple[ReceivedUpdate, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedTestReport:
    """One client's evaluation in a `TestReportsReceived`."""

    __test__: ClassVar[bool] = False  # not a pytest test class, whatever its name
    client_id: UUID
    num_examples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TestReportsReceived(Event):
    """Clients reported their evaluations of a round's global model, recorded in one transaction
    (as `UpdatesReceived` for updates)."""

    routing_key: ClassVar[str] = "test_reports.received"
    __test__: ClassVar[bool] = False
    training_id: UUID
    round: int
    reports: tuple[ReceivedTestReport, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateReceived(Event):
    """A client's model update for a round was validated, stored and recorded.

    What the API announced per update before `UpdatesReceived`; no longer emitted, still consumed
    (the orchestrator counts it as it counts a batch) so that messages an older API process left in
    its outbox or on the queue are not lost across an upgrade."""

    routing_key: ClassVar[str] = "update.received"
    training_id: UUID
    round: int
    client_id: UUID
    update_id: UUID
    num_examples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TestMetricsReceived(Event):
    """A client reported its evaluation of a round's global model.

    As `UpdateReceived`: replaced by `TestReportsReceived`, still consumed across an upgrade."""

    routing_key: ClassVar[str] = "test_metrics.received"
    __test__: ClassVar[bool] = False  # not a pytest test class, whatever its name
    training_id: UUID
    round: int
    client_id: UUID
    num_examples: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregateRound(Command):
    """Aggregate a round's updates into a new global model; consumed by the aggregator (a work queue)."""

    routing_key: ClassVar[str] = "job.aggregate_round"
    job_id: UUID
    training_id: UUID
    round: int
    method: str
    base_model_id: UUID
    base_blob_key: str
    updates: tuple[UpdateRef, ...]
    delete_updates_after: bool = True
    params: dict[str, Any] = field(default_factory=dict)
    """The method's parameters (`shared.aggregation.method_params` validates them)."""
    update_kind: str = "weights"
    """`weights` (clients upload their models) or `delta` (their models minus the base)."""
    exclude_vars: str | None = None
    """Regex of the tensors clients leave out; they keep the base's values."""
    max_update_norm: float | None = None
    """Updates whose delta to the base has a larger L2 norm (floating tensors) are rejected."""
    base_state_blob_key: str | None = None
    """The server state the base model's round left (e.g. Adam moments), as a tensor blob."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatePart(Command):
    """Compute one part of a round split across aggregators; consumed by the aggregator (a work queue).

    `round_job` is the round's job; for a batch of a linear method its `updates` are the batch's,
    for a shard of a coordinate-wise method they are all of them and `tensors` names the shard.
    """

    routing_key: ClassVar[str] = "job.aggregate_part"
    round_job: AggregateRound
    part: int
    parts: int
    tensors: tuple[str, ...] = ()
    """The tensor names this part computes (a shard); empty for a batch (every tensor)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CombineParts(Command):
    """Every part of a split round is done: combine them into the round's model (aggregator)."""

    routing_key: ClassVar[str] = "job.combine_parts"
    job_id: UUID
    training_id: UUID
    round: int
    parts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelAggregated(Event):
    """A round's new global model is stored; `model_id` names its row, `blob_key` its bytes."""

    routing_key: ClassVar[str] = "model.aggregated"
    job_id: UUID
    training_id: UUID
    round: int
    model_id: UUID
    blob_key: str
    num_updates: int
    """Updates aggregated (rejected ones not counted)."""
    num_examples: int
    """Examples behind the aggregated updates."""
    num_rejected: int = 0
    """Updates left out by validation (their reasons are on their `client_update` rows)."""
    rejected: tuple[UUID, ...] = ()
    """Ids of the updates left out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregationFailed(Event):
    """An aggregation job could not produce a model; `reason` says why."""

    routing_key: ClassVar[str] = "aggregation.failed"
    job_id: UUID
    training_id: UUID
    round: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationIssued(Event):
    """A notification to push to `receivers` (principal ids) over server-sent events and webhooks.

    `event_id`, `notification_type`, `training_id`, `body` and `issued_at` are exactly what clients
    receive: the seed's payload `{"notification_type", "training_uuid", "body"}` plus id and timestamp.
    """

    routing_key: ClassVar[str] = "notification.issued"
    event_id: UUID
    notification_type: NotificationType
    training_id: UUID
    receivers: tuple[UUID, ...]
    body: dict[str, Any] = field(default_factory=dict)
    issued_at: datetime = field(default_factory=utcnow)


def _concrete_messages() -> dict[str, type[Message]]:
    found: dict[str, type[Message]] = {}
    stack: list[type[Message]] = [Message]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            # dataclass(slots=True) replaces each class; the pre-slots original lingers as a subclass.
            if "__slots__" in sub.__dict__ and sub not in (Event, Command):
                found[sub.__name__] = sub
    return found


MESSAGE_TYPES: dict[str, type[Message]] = _concrete_messages()
"""Every concrete message class by its wire name, derived from the class tree (never listed twice)."""
