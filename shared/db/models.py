"""The shared schema: principals, models and members, trainings, rounds, updates, metrics, outbox, inbox.

These tables are the contract between the api (writes requests), the orchestrator (owns training
state) and the aggregator (writes aggregated models). Tables one service alone owns live in it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from shared.aggregation import AggregationSpec, FedProxParams
from shared.db.base import Base
from shared.enums import Role, RoundPhase, TrainingState
from shared.events import utcnow


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store in UTC; a naive value is taken to be UTC already."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_Time = UtcDateTime()


class Principal(Base):
    """An actor or a client, identified by a bearer token (only its SHA-256 is stored)."""

    __tablename__ = "principal"

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class Model(Base):
    """A set of named tensors in the blob store: an initial model or a round's global model."""

    __tablename__ = "model"

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    name: Mapped[str] = mapped_column(String(200), default="")
    owner_id: Mapped[UUID | None] = mapped_column(ForeignKey("principal.id"))
    blob_key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    """name -> [dtype, shape]: the signature every update must match."""
    training_id: Mapped[UUID | None] = mapped_column(index=True)
    """The training whose round produced this model; None for uploaded models."""
    round: Mapped[int | None] = mapped_column(Integer)
    state_blob_key: Mapped[str | None] = mapped_column(String(200))
    """The server state its round's method left for the next round (a tensor blob), if any."""
    record: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the method recorded about its round (DP noise, Krum's selection); None for uploads."""
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class ModelMember(Base):
    """One member of an ensemble round's model: a full model of its own, in the blob store."""

    __tablename__ = "model_member"

    model_id: Mapped[UUID] = mapped_column(ForeignKey("model.id"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    """Position among the members: the order their updates were aggregated in."""
    blob_key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    update_id: Mapped[UUID | None] = mapped_column()
    """The client update this member came from."""
    client_id: Mapped[UUID | None] = mapped_column()


class Training(Base):
    """A federated training: its configuration and, owned by the orchestrator, its state."""

    __tablename__ = "training"

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    owner_id: Mapped[UUID] = mapped_column(ForeignKey("principal.id"))
    initial_model_id: Mapped[UUID] = mapped_column(ForeignKey("model.id"))
    current_model_id: Mapped[UUID] = mapped_column(ForeignKey("model.id"))
    aggregation: Mapped[str] = mapped_column(String(32))
    aggregation_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    """The method's parameters with their defaults filled in (`shared.aggregation`)."""
    update_kind: Mapped[str] = mapped_column(String(16), default="weights", server_default="weights")
    exclude_vars: Mapped[str | None] = mapped_column(Text)
    """Regex of the tensors clients leave out of their updates (they keep the server's values)."""
    max_update_norm: Mapped[float | None] = mapped_column(Float)
    rounds: Mapped[int] = mapped_column(Integer)
    min_clients: Mapped[int] = mapped_column(Integer)
    round_timeout_s: Mapped[float] = mapped_column(Float)
    skip_model_tests: Mapped[bool] = mapped_column(Boolean, default=False)
    model_test_after_each_round: Mapped[bool] = mapped_column(Boolean, default=True)
    delete_local_models_after_aggregation: Mapped[bool] = mapped_column(Boolean, default=True)
    state: Mapped[TrainingState] = mapped_column(
        Enum(TrainingState, native_enum=False, length=16), default=TrainingState.INITIAL
    )
    phase: Mapped[RoundPhase | None] = mapped_column(Enum(RoundPhase, native_enum=False, length=16))
    round: Mapped[int] = mapped_column(Integer, default=0)
    """The current round, counted from 1; 0 before the start."""
    deadline_at: Mapped[datetime | None] = mapped_column(_Time, index=True)
    """When the current phase times out (collecting or testing), None otherwise."""
    failure_reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=0)
    """Bumped by every transition: a compare-and-set guard against two orchestrators advancing at once."""
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)

    def aggregation_spec(self) -> AggregationSpec:
        """The training's aggregation as the contract states it."""
        return AggregationSpec.model_validate(
            {
                "method": self.aggregation,
                "params": dict(self.aggregation_params or {}),
                "update_kind": self.update_kind or "weights",
                "exclude_vars": self.exclude_vars,
                "max_update_norm": self.max_update_norm,
            }
        )

    def client_config(self) -> dict[str, Any]:
        """What clients must know to train a round: the update kind, the excluded tensors, FedProx's mu."""
        spec = self.aggregation_spec()
        config: dict[str, Any] = {"update_kind": spec.update_kind.value, "exclude_vars": spec.exclude_vars}
        params = spec.typed_params()
        if isinstance(params, FedProxParams):
            config["mu"] = params.mu
        return config


class Participant(Base):
    """A client taking part in a training."""

    __tablename__ = "participant"

    training_id: Mapped[UUID] = mapped_column(ForeignKey("training.id"), primary_key=True)
    client_id: Mapped[UUID] = mapped_column(ForeignKey("principal.id"), primary_key=True)


class TrainingRound(Base):
    """One round's timeline and result."""

    __tablename__ = "training_round"

    training_id: Mapped[UUID] = mapped_column(ForeignKey("training.id"), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
    aggregated_at: Mapped[datetime | None] = mapped_column(_Time)
    finished_at: Mapped[datetime | None] = mapped_column(_Time)
    model_id: Mapped[UUID | None] = mapped_column(ForeignKey("model.id"))
    num_updates: Mapped[int | None] = mapped_column(Integer)
    num_examples: Mapped[int | None] = mapped_column(BigInteger)


class ClientUpdate(Base):
    """A client's accepted model update for a round; at most one per client and round."""

    __tablename__ = "client_update"
    __table_args__ = (UniqueConstraint("training_id", "round", "client_id"),)

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    training_id: Mapped[UUID] = mapped_column(ForeignKey("training.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    client_id: Mapped[UUID] = mapped_column(ForeignKey("principal.id"))
    blob_key: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
    blob_deleted_at: Mapped[datetime | None] = mapped_column(_Time)
    rejected_reason: Mapped[str | None] = mapped_column(Text)
    """Why the aggregator left this update out of its round (None: aggregated, or not yet)."""


class TestMetric(Base):
    """A client's evaluation of a round's global model."""

    __tablename__ = "test_metric"
    __table_args__ = (UniqueConstraint("training_id", "round", "client_id"),)

    id: Mapped[UUID] = mapped_column(primary_key=True, default=uuid4)
    training_id: Mapped[UUID] = mapped_column(ForeignKey("training.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    client_id: Mapped[UUID] = mapped_column(ForeignKey("principal.id"))
    num_examples: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class OutboxMessage(Base):
    """A message written in the same transaction as the state it describes; the relay publishes it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    message_id: Mapped[UUID] = mapped_column(unique=True)
    type: Mapped[str] = mapped_column(String(100))
    routing_key: Mapped[str] = mapped_column(String(200))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    correlation_id: Mapped[UUID | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class InboxMessage(Base):
    """A message a consumer has applied; recorded in the transaction of its effects."""

    __tablename__ = "inbox"

    consumer: Mapped[str] = mapped_column(String(100), primary_key=True)
    message_id: Mapped[UUID] = mapped_column(primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
