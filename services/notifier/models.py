"""The notifier's own tables: notifications, their receivers, webhooks and pending webhook deliveries.

`notification.seq` is the SSE event id: global and increasing, so a client resumes with
`Last-Event-ID` by asking for every notification it receives with a larger seq.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db.base import Base
from shared.events import utcnow

_Time = DateTime(timezone=True)
# SQLite autoincrements only an INTEGER primary key; PostgreSQL gets a 64-bit identity.
_Seq = BigInteger().with_variant(Integer, "sqlite")


class Notification(Base):
    """One issued notification; `payload` is exactly the JSON clients receive."""

    __tablename__ = "notification"
    # AUTOINCREMENT on SQLite: a seq is never reused, even after the newest row is deleted.
    __table_args__ = {"sqlite_autoincrement": True}

    seq: Mapped[int] = mapped_column(_Seq, primary_key=True, autoincrement=True)
    event_id: Mapped[UUID] = mapped_column(unique=True)
    training_id: Mapped[UUID] = mapped_column(index=True)
    notification_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    issued_at: Mapped[datetime] = mapped_column(_Time)


class NotificationReceiver(Base):
    """A principal that receives a notification; the primary key serves the replay query."""

    __tablename__ = "notification_receiver"

    # No foreign key to principal: receivers are whatever the issuing service named, and a
    # notification must not be refused because one receiver has since gone.
    principal_id: Mapped[UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(_Seq, ForeignKey("notification.seq"), primary_key=True)


class Webhook(Base):
    """A principal's webhook: where its notifications are POSTed and the secret that signs them."""

    __tablename__ = "webhook"

    principal_id: Mapped[UUID] = mapped_column(ForeignKey("principal.id"), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(_Time, default=utcnow)


class WebhookDelivery(Base):
    """One notification to POST to one receiver's webhook; survives a crash until delivered or dead.

    `next_attempt_at` is set while the delivery is pending (a claimed one holds a lease there) and
    NULL once it is delivered or dead, so the due-query index holds only pending rows.
    """

    __tablename__ = "webhook_delivery"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(_Seq, primary_key=True, autoincrement=True)
    seq: Mapped[int] = mapped_column(_Seq, ForeignKey("notification.seq"))
    principal_id: Mapped[UUID] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(_Time, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(_Time)
    last_error: Mapped[str | None] = mapped_column(Text)
