"""Consumes `NotificationIssued`: stores the notification, its receivers and its webhook deliveries.

Everything is written in the consumer's unit of work (whose inbox drops a redelivered message);
once it commits, live streams get the notification from the hub and the webhook worker wakes.

A round's notification (UPDATE_ROUND_START, MODEL_TEST_ROUND) whose global model is small
(`FEDHUB_INLINE_MODEL_MAX_BYTES`, default 64 KiB) carries the model itself in
``body.global_model``: ``{"media_type": "application/msgpack", "sha256": <hex of the bytes>,
"base64": <the bytes of GET /v1/models/{id}/weights>}``. A client then trains without a download,
as Flower's and NVFlare's clients get the parameters with their task. A larger model is only named
(claim check: its bytes never ride the broker, nor every stream).
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import structlog
from sqlalchemy import CursorResult, insert, literal, select

from services.notifier.models import Notification, NotificationReceiver, Webhook, WebhookDelivery
from services.notifier.payloads import LiveNotification, dumps, notification_payload, sse_frame
from shared.blobs import BlobStore
from shared.db.models import Model
from shared.db.uow import UnitOfWork
from shared.events import Message, NotificationIssued, NotificationType, utcnow
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


@dataclass(frozen=True, slots=True)
class InlineModels:
    """Where a round notification's small global model comes from, and how small is small."""

    blobs: BlobStore
    max_bytes: int
    """Models up to this size travel in the notification; 0: never."""


_WITH_MODEL = frozenset({NotificationType.UPDATE_ROUND_START, NotificationType.MODEL_TEST_ROUND})


async def inline_model(
    message: NotificationIssued, uow: UnitOfWork, models: InlineModels
) -> dict[str, str] | None:
    """The `global_model` body entry of a round notification whose model is small enough, else None."""
    if models.max_bytes <= 0 or message.notification_type not in _WITH_MODEL:
        return None
    try:
        model_id = UUID(str(message.body["global_model_uuid"]))
    except (KeyError, ValueError):
        return None
    row = (
        await uow.session.execute(
            select(Model.blob_key, Model.digest, Model.size_bytes).where(Model.id == model_id)
        )
    ).one_or_none()
    if row is None or row.size_bytes > models.max_bytes:
        return None
    data = await models.blobs.get(row.blob_key)
    return {
        "media_type": "application/msgpack",
        "sha256": row.digest,
        "base64": base64.b64encode(data).decode("ascii"),
    }


async def store_notification(
    message: NotificationIssued, uow: UnitOfWork, models: InlineModels | None = None
) -> StoredNotification | None:
    """Insert the notification, one receiver row per receiver and one delivery per receiver webhook.

    Returns None when a notification with this `event_id` is already stored (the issuer emitted
    it twice under different message ids). Receivers are bulk inserted: one statement however many.
    With `models`, a round notification carries its small global model (see the module doc).
    """
    session = uow.session
    known = await session.scalar(select(Notification.seq).where(Notification.event_id == message.event_id))
    if known is not None:
        log.info("notification.duplicate_event", event_id=str(message.event_id), seq=known)
        return None
    payload = notification_payload(message)
    inline = await inline_model(message, uow, models) if models is not None else None
    if inline is not None:
        payload["body"]["global_model"] = inline
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
    publish: Callable[[LiveNotification], object],
    wake_webhooks: Callable[[], None],
    models: InlineModels | None = None,
) -> Mapping[type[Message], Handler]:
    """The notifier's handler registry; `publish` feeds live streams, `wake_webhooks` the worker,
    `models` puts small global models into round notifications."""

    async def on_notification_issued(message: NotificationIssued, uow: UnitOfWork) -> None:
        """Store a notification; after commit, push it to live streams and wake the webhook worker."""
        stored = await store_notification(message, uow, models)
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
