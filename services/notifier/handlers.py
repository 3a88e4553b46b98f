"""Consumes `NotificationIssued`: stores the notification, its receivers and its webhook deliveries.

Everything is written in the consumer's unit of work (whose inbox drops a redelivered message);
once it commits, live streams get the notification from the hub and the webhook worker wakes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy import CursorResult, insert, literal, select

from services.notifier.models import Notification, NotificationReceiver, Webhook, WebhookDelivery
from services.notifier.payloads import LiveNotification, dumps, notification_payload, sse_frame
from shared.db.uow import UnitOfWork
from shared.events import Message, NotificationIssued, utcnow
from shared.messaging import Handler
from shared.metrics import REGISTRY

log = structlog.get_logger(component="notifier.handlers")

STORED_SECONDS = REGISTRY.histogram(
    "fedhub_notification_stored_seconds",
    "From a notification's issue (the orchestrator's transition) to the commit that stores it",
    ("notification_type",),
)


@dataclass(frozen=True, slots=True)
class StoredNotification:
    """What storing one notification produced."""

    live: LiveNotification
    webhook_deliveries: int


async def store_notification(message: NotificationIssued, uow: UnitOfWork) -> StoredNotification | None:
    """Insert the notification, one receiver row per receiver and one delivery per receiver webhook.

    Returns None when a notification with this `event_id` is already stored (the issuer emitted
    it twice under different message ids). Receivers are bulk inserted: one statement however many.
    """
    session = uow.session
    known = await session.scalar(select(Notification.seq).where(Notification.event_id == message.event_id))
    if known is not None:
        log.info("notification.duplicate_event", event_id=str(message.event_id), seq=known)
        return None
    payload = notification_payload(message)
    seq = await session.scalar(
        insert(Notification)
        .values(
            event_id=message.event_id,
            training_id=message.training_id,
            notification_type=str(message.notification_type),
            payload=payload,
            issued_at=message.issued_at,
        )
        .returning(Notification.seq)
    )
    if seq is None:  # pragma: no cover - RETURNING always yields the new key
        raise RuntimeError("inserting a notification returned no seq")
    receivers = frozenset(message.receivers)
    if receivers:
        await session.execute(
            insert(NotificationReceiver), [{"principal_id": p, "seq": seq} for p in receivers]
        )
    # One INSERT ... SELECT: the database pairs receivers with webhooks, however many receivers.
    created = cast(
        "CursorResult[Any]",
        await session.execute(
            insert(WebhookDelivery).from_select(
                ["seq", "principal_id", "attempts", "next_attempt_at"],
                select(
                    literal(seq),
                    Webhook.principal_id,
                    literal(0),
                    literal(utcnow(), WebhookDelivery.next_attempt_at.type),
                )
                .join(NotificationReceiver, NotificationReceiver.principal_id == Webhook.principal_id)
                .where(NotificationReceiver.seq == seq),
            ),
        ),
    )
    deliveries = max(created.rowcount, 0)
    live = LiveNotification(
        seq=seq,
        training_id=message.training_id,
        receivers=receivers,
        frame=sse_frame(seq, str(message.notification_type), dumps(payload)),
        notification_type=str(message.notification_type),
        issued_at=message.issued_at.timestamp(),
    )
    log.info(
        "notification.stored",
        seq=seq,
        event_id=str(message.event_id),
        notification_type=str(message.notification_type),
        receivers=len(receivers),
        webhook_deliveries=deliveries,
    )
    return StoredNotification(live=live, webhook_deliveries=deliveries)


def notifier_handlers(
    publish: Callable[[LiveNotification], object], wake_webhooks: Callable[[], None]
) -> Mapping[type[Message], Handler]:
    """The notifier's handler registry; `publish` feeds live streams, `wake_webhooks` the worker."""

    async def on_notification_issued(message: NotificationIssued, uow: UnitOfWork) -> None:
        """Store a notification; after commit, push it to live streams and wake the webhook worker."""
        stored = await store_notification(message, uow)
        if stored is None:
            return

        def after_commit() -> None:
            committed = time.time()
            live = dataclasses.replace(stored.live, committed_at=committed)
            STORED_SECONDS.observe(committed - live.issued_at, notification_type=live.notification_type)
            publish(live)
            if stored.webhook_deliveries:
                wake_webhooks()

        uow.after_commit(after_commit)

    return {NotificationIssued: on_notification_issued}
