"""Webhooks: `PUT/GET/DELETE /v1/webhook` and the worker that POSTs signed notifications with retries.

Deliveries are rows (`webhook_delivery`) written with the notification, so a crash loses none: the
worker claims due rows with a lease, POSTs outside any transaction, then records the outcome.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

import httpx
import structlog
from fastapi import APIRouter, Depends, Header, Response
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, TypeAdapter, field_validator
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from services.notifier.deps import ErrorMappingRoute, authenticate
from services.notifier.models import Notification, Webhook, WebhookDelivery
from services.notifier.payloads import dumps
from services.notifier.settings import NotifierSettings
from services.notifier.signing import sign
from shared.auth import PrincipalCache, bearer_token
from shared.db.uow import UnitOfWorkFactory
from shared.errors import Conflict, NotFound
from shared.events import utcnow

log = structlog.get_logger(component="notifier.webhooks")

_HTTP_URL = TypeAdapter(AnyHttpUrl)


# --- HTTP ---------------------------------------------------------------------------------------


class WebhookIn(BaseModel):
    """Where to POST the caller's notifications and the secret that signs them."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="an http(s) URL")
    secret: str = Field(min_length=16, max_length=512, description="HMAC-SHA256 key, at least 16 characters")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        _HTTP_URL.validate_python(value)
        return value


class WebhookOut(BaseModel):
    """A registered webhook as its owner sees it (never the secret)."""

    principal_id: UUID
    url: str
    created_at: datetime
    updated_at: datetime


def _aware(value: datetime) -> datetime:
    # SQLite hands timestamps back naive; every stored timestamp is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _out(hook: Webhook) -> WebhookOut:
    return WebhookOut(
        principal_id=hook.principal_id,
        url=hook.url,
        created_at=_aware(hook.created_at),
        updated_at=_aware(hook.updated_at),
    )


def webhook_router(uow: UnitOfWorkFactory, principals: PrincipalCache | None = None) -> APIRouter:
    """The caller's own webhook: `PUT`, `GET` and `DELETE /v1/webhook`."""
    router = APIRouter(route_class=ErrorMappingRoute, tags=["notifications"])

    async def caller(authorization: Annotated[str | None, Header()] = None) -> UUID:
        return await authenticate(uow, bearer_token(authorization), principals)

    @router.put("/v1/webhook")
    async def put_webhook(body: WebhookIn, principal_id: Annotated[UUID, Depends(caller)]) -> WebhookOut:
        """Register or replace the caller's webhook."""
        now = utcnow()
        try:
            async with uow() as unit:
                hook = await unit.session.get(Webhook, principal_id)
                if hook is None:
                    hook = Webhook(
                        principal_id=principal_id,
                        url=body.url,
                        secret=body.secret,
                        created_at=now,
                        updated_at=now,
                    )
                    unit.session.add(hook)
                else:
                    hook.url, hook.secret, hook.updated_at = body.url, body.secret, now
        except IntegrityError:
            raise Conflict(f"webhook of principal {principal_id} was registered concurrently") from None
        log.info("webhook.registered", principal_id=str(principal_id), url=body.url)
        return _out(hook)

    @router.get("/v1/webhook")
    async def get_webhook(principal_id: Annotated[UUID, Depends(caller)]) -> WebhookOut:
        """The caller's webhook, or 404."""
        async with uow() as unit:
            hook = await unit.session.get(Webhook, principal_id)
        if hook is None:
            raise NotFound(f"principal {principal_id} has no webhook")
        return _out(hook)

    @router.delete("/v1/webhook", status_code=204, response_class=Response)
    async def delete_webhook(principal_id: Annotated[UUID, Depends(caller)]) -> None:
        """Remove the caller's webhook; its pending deliveries are dropped (idempotent)."""
        async with uow() as unit:
            hook = await unit.session.get(Webhook, principal_id)
            if hook is not None:
                await unit.session.delete(hook)
            await unit.session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.principal_id == principal_id, WebhookDelivery.next_attempt_at.is_not(None)
                )
                .values(next_attempt_at=None, last_error="webhook removed")
            )
        log.info("webhook.removed", principal_id=str(principal_id), existed=hook is not None)

    return router


# --- delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    delivery_id: int
    attempts: int
    principal_id: UUID
    event_id: UUID
    body: bytes
    url: str | None
    secret: str | None


@dataclass(frozen=True, slots=True)
class _Outcome:
    attempt: _Attempt
    error: str | None


class WebhookWorker:
    """Delivers due `webhook_delivery` rows; woken after new ones commit, polling as a fallback."""

    BATCH = 50
    """Deliveries claimed and POSTed concurrently per pass."""

    def __init__(
        self, uow: UnitOfWorkFactory, settings: NotifierSettings, *, client: httpx.AsyncClient | None = None
    ) -> None:
        self._uow = uow
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # A claimed row waits this long before another pass may retry it (a crash mid-POST).
        self._lease = timedelta(seconds=settings.webhook_timeout_s * 2 + 5)

    def wake(self) -> None:
        """Ask for a delivery pass now."""
        self._wake.set()

    def start(self) -> None:
        """Start the delivery loop (idempotent)."""
        if self._task is not None:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._settings.webhook_timeout_s,
                follow_redirects=False,
                headers={"User-Agent": "fedhub-webhooks"},
            )
        self._task = asyncio.create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        """Stop the loop; a POST in flight is abandoned and retried once its lease expires."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _run(self) -> None:
        poll = self._settings.webhook_poll_s
        while True:
            self._wake.clear()
            try:
                until_next = await self.deliver_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook.pass_failed", error=f"{type(exc).__name__}: {exc}")
                until_next = None
            wait = poll if until_next is None else min(max(until_next, 0.0), poll)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def deliver_due(self) -> float | None:
        """POST every due delivery; return seconds until the next pending one (None: none pending)."""
        while True:
            attempts = await self._claim()
            if attempts:
                outcomes = await asyncio.gather(*(self._post(a) for a in attempts))
                await self._record(outcomes)
            if len(attempts) < self.BATCH:
                break
        async with self._uow() as unit:
            due = await unit.session.scalar(select(func.min(WebhookDelivery.next_attempt_at)))
        if due is None:
            return None
        return (_aware(due) - utcnow()).total_seconds()

    async def _claim(self) -> list[_Attempt]:
        now = utcnow()
        query = (
            select(
                WebhookDelivery.id,
                WebhookDelivery.attempts,
                WebhookDelivery.principal_id,
                Notification.event_id,
                Notification.payload,
                Webhook.url,
                Webhook.secret,
            )
            .join(Notification, Notification.seq == WebhookDelivery.seq)
            .outerjoin(Webhook, Webhook.principal_id == WebhookDelivery.principal_id)
            .where(WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(self.BATCH)
        )
        async with self._uow() as unit:
            if unit.session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
            rows = (await unit.session.execute(query)).all()
            if rows:
                await unit.session.execute(
                    update(WebhookDelivery)
                    .where(WebhookDelivery.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=now + self._lease)
                )
        return [
            _Attempt(
                delivery_id=r.id,
                attempts=r.attempts,
                principal_id=r.principal_id,
                event_id=r.event_id,
                body=dumps(r.payload),
                url=r.url,
                secret=r.secret,
            )
            for r in rows
        ]

    async def _post(self, attempt: _Attempt) -> _Outcome:
        if attempt.url is None or attempt.secret is None:
            return _Outcome(attempt, "no webhook registered")
        if self._client is None:
            raise RuntimeError("WebhookWorker used before start()")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Fedhub-Event-Id": str(attempt.event_id),
            "X-Fedhub-Timestamp": timestamp,
            "X-Fedhub-Signature": sign(attempt.secret, timestamp, attempt.body),
        }
        try:
            response = await self._client.post(attempt.url, content=attempt.body, headers=headers)
        except httpx.HTTPError as exc:
            return _Outcome(attempt, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            return _Outcome(attempt, None)
        return _Outcome(attempt, f"HTTP {response.status_code} {response.reason_phrase}".strip())

    async def _record(self, outcomes: list[_Outcome]) -> None:
        now = utcnow()
        s = self._settings
        rows: list[dict[str, Any]] = []
        for outcome in outcomes:
            a = outcome.attempt
            attempts = a.attempts + 1
            context = {
                "delivery_id": a.delivery_id,
                "principal_id": str(a.principal_id),
                "attempts": attempts,
            }
            if outcome.error is None:
                rows.append(
                    {
                        "id": a.delivery_id,
                        "attempts": attempts,
                        "next_attempt_at": None,
                        "delivered_at": now,
                        "last_error": None,
                    }
                )
                log.info("webhook.delivered", event_id=str(a.event_id), **context)
                continue
            dead = a.url is None or attempts >= s.webhook_max_attempts
            backoff = min(s.webhook_backoff_base_s * 2 ** (attempts - 1), s.webhook_backoff_max_s)
            rows.append(
                {
                    "id": a.delivery_id,
                    "attempts": attempts,
                    "next_attempt_at": None if dead else now + timedelta(seconds=backoff),
                    "delivered_at": None,
                    "last_error": outcome.error[:2000],
                }
            )
            if dead:
                log.warning("webhook.dead", event_id=str(a.event_id), error=outcome.error, **context)
            else:
                log.info("webhook.retry_scheduled", error=outcome.error, backoff_s=backoff, **context)
        async with self._uow() as unit:
            await unit.session.execute(update(WebhookDelivery), rows)
