"""The aggregator's own tables: the plan of a round split into parts, and each finished part.

A round with more updates than one job should take is split (`services.aggregator.split`): its
`aggregation_plan` row counts the parts done, and each part's row, written in the same transaction
as the counter's increment, holds where its result is and which updates it took or rejected. The
part that brings the count to the total emits the combine job in that transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import JSON, DateTime, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.base import Base
from shared.events import utcnow

_Time = DateTime(timezone=True)


class AggregationPlan(Base):
    """A round split into parts: the job it came from, the split, and how many parts are done."""

    __tablename__ = "aggregation_plan"

    training_id: Mapped[UUID] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[UUID] = mapped_column()
    job: Mapped[bytes] = mapped_column(LargeBinary)
    """The round's `AggregateRound`, encoded: the combine job reads it back."""
    kind: Mapped[str] = mapped_column(String(16))
    """`batches` (a linear method's updates in batches) or `shards` (tensors in shards)."""
    parts_total: Mapped[int] = mapped_column(Integer)
    parts_done: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class AggregationPart(Base):
    """One finished part of a split round."""

    __tablename__ = "aggregation_part"

    training_id: Mapped[UUID] = mapped_column(primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_key: Mapped[str | None] = mapped_column(String(200))
    """Its result: a linear method's `Partial`, or a shard's tensors (None when the part failed)."""
    accepted: Mapped[list[str]] = mapped_column(JSON, default=list)
    """Ids of the updates it aggregated, in order."""
    rejected: Mapped[list[list[str]]] = mapped_column(JSON, default=list)
    """`[update id, reason]` of each update it left out."""
    record: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    failure: Mapped[str | None] = mapped_column(Text)
    """Why the part could not be computed; the combine job then fails the round with it."""
    done_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
