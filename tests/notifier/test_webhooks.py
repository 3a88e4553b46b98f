"""Webhooks: registration endpoints, and signed delivery with retries to a real local receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.notifier.models import WebhookDelivery
from services.notifier.service import Notifier
from services.notifier.signing import verify
from shared.runtime import Runtime
from tests.notifier.conftest import (
    WAIT_S,
    emit,
    expected_payload,
    make_principal,
    notification,
    serve,
    wait_for,
)

SECRET = "a-secret-of-24-characters"


@dataclass
class Receiver:
    """A webhook endpoint that answers from a script of status codes, then 200, recording each call."""

    statuses: list[int]
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    succeeded: asyncio.Event = field(default_factory=asyncio.Event)

    async def endpoint(self, request: Request) -> Response:
        """Record the call and answer the next scripted status."""
        self.calls.append((dict(request.headers), await request.body()))
        status = self.statuses.pop(0) if self.statuses else 200
        if 200 <= status < 300:
            self.succeeded.set()
        return Response(status_code=status)


@pytest.fixture
def receiver_server() -> Callable[[list[int]], Any]:
    """A factory serving a `Receiver` on its own uvicorn port: yields (receiver, hook URL)."""

    @contextlib.asynccontextmanager
    async def start(statuses: list[int]) -> AsyncIterator[tuple[Receiver, str]]:
        receiver = Receiver(list(statuses))
        app = Starlette(routes=[Route("/hook", receiver.endpoint, methods=["POST"])])
        async with serve(app) as url:
            yield receiver, f"{url}/hook"

    return start


async def test_retried_delivery_arrives_signed(server, receiver_server):
    """A 500 is retried; the delivery arrives with headers and a signature that `verify` accepts."""
    client = await make_principal(server.runtime, "client")
    bystander = await make_principal(server.runtime, "no-webhook")
    async with receiver_server([500]) as (receiver, hook_url), httpx.AsyncClient(base_url=server.url) as http:
        put = await http.put("/v1/webhook", headers=client.headers, json={"url": hook_url, "secret": SECRET})
        assert put.status_code == 200, put.text
        sent = await emit(server.runtime, notification([client.id, bystander.id]))
        async with asyncio.timeout(WAIT_S):
            await receiver.succeeded.wait()

    assert len(receiver.calls) == 2
    (_, first_body), (headers, body) = receiver.calls
    assert body == first_body
    assert json.loads(body) == expected_payload(sent)
    assert headers["content-type"] == "application/json"
    assert headers["x-fedhub-event-id"] == str(sent.event_id)
    timestamp, signature = headers["x-fedhub-timestamp"], headers["x-fedhub-signature"]
    assert timestamp.isdigit()
    assert signature.startswith("sha256=")
    assert verify(SECRET, timestamp, body, signature, tolerance_s=300)
    assert not verify("another-secret-of-24-chars", timestamp, body, signature)
    assert not verify(SECRET, timestamp, body + b" ", signature)

    delivery = await wait_for(lambda: _delivered(server.runtime), "the delivery to be recorded")
    assert delivery.attempts == 2
    assert delivery.principal_id == client.id
    assert delivery.next_attempt_at is None
    assert delivery.last_error is None
    async with server.runtime.uow() as uow:
        assert await uow.session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1


async def _delivered(runtime: Runtime) -> WebhookDelivery | None:
    async with runtime.uow() as uow:
        return await uow.session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.delivered_at.is_not(None))
        )


async def test_delivery_is_left_dead_after_max_attempts(start_notifier, receiver_server):
    """A receiver that always fails gets `webhook_max_attempts` tries; the row keeps the last error."""
    async with start_notifier(webhook_max_attempts=3) as server:
        client = await make_principal(server.runtime, "client")
        async with receiver_server([503] * 10) as (receiver, hook_url):
            async with httpx.AsyncClient(base_url=server.url) as http:
                put = await http.put(
                    "/v1/webhook", headers=client.headers, json={"url": hook_url, "secret": SECRET}
                )
                assert put.status_code == 200
            await emit(server.runtime, notification([client.id]))
            dead = await wait_for(lambda: _dead(server.runtime), "the delivery to die")
            assert len(receiver.calls) == 3
    assert dead.attempts == 3
    assert dead.delivered_at is None
    assert "503" in dead.last_error


async def _dead(runtime: Runtime) -> WebhookDelivery | None:
    async with runtime.uow() as uow:
        return await uow.session.scalar(
            select(WebhookDelivery).where(
                WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.delivered_at.is_(None)
            )
        )


async def test_unreachable_receiver_is_retried(server, receiver_server):
    """A refused connection counts as a failed attempt and is retried once the receiver is up."""
    client = await make_principal(server.runtime, "client")
    async with receiver_server([]) as (_, hook_url):
        pass  # the port is free again: connections are refused
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.put("/v1/webhook", headers=client.headers, json={"url": hook_url, "secret": SECRET})
    await emit(server.runtime, notification([client.id]))
    failed = await wait_for(lambda: _failed_once(server.runtime), "a failed attempt")
    assert failed.delivered_at is None
    assert failed.next_attempt_at is not None
    assert "Connect" in failed.last_error


async def _failed_once(runtime: Runtime) -> WebhookDelivery | None:
    async with runtime.uow() as uow:
        return await uow.session.scalar(select(WebhookDelivery).where(WebhookDelivery.attempts >= 1))


async def test_webhook_endpoints_in_a_foreign_app(runtime, settings):
    """Included in an app without fedhub's handlers, the routes still answer the error shape."""
    notifier = Notifier(settings, runtime)
    app = FastAPI()
    app.include_router(notifier.router)
    caller = await make_principal(runtime, "client")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        unauthenticated = await http.get("/v1/webhook")
        assert unauthenticated.status_code == 401
        assert unauthenticated.json()["error"] == "Unauthenticated"

        missing = await http.get("/v1/webhook", headers=caller.headers)
        assert missing.status_code == 404
        assert missing.json()["error"] == "NotFound"

        for bad in (
            {"url": "ftp://example.com/hook", "secret": SECRET},
            {"url": "not a url", "secret": SECRET},
            {"url": "https://example.com/hook", "secret": "short"},
            {"url": "https://example.com/hook"},
        ):
            rejected = await http.put("/v1/webhook", headers=caller.headers, json=bad)
            assert rejected.status_code == 422, bad
            assert rejected.json()["error"] == "ValidationError"

        created = await http.put(
            "/v1/webhook", headers=caller.headers, json={"url": "https://example.com/a", "secret": SECRET}
        )
        assert created.status_code == 200
        assert "secret" not in created.json()
        assert created.json()["url"] == "https://example.com/a"
        assert created.json()["principal_id"] == str(caller.id)

        replaced = await http.put(
            "/v1/webhook", headers=caller.headers, json={"url": "http://127.0.0.1:9/b", "secret": SECRET * 2}
        )
        assert replaced.json()["url"] == "http://127.0.0.1:9/b"
        assert replaced.json()["created_at"] == created.json()["created_at"]

        fetched = await http.get("/v1/webhook", headers=caller.headers)
        assert fetched.status_code == 200
        assert fetched.json() == replaced.json()

        deleted = await http.delete("/v1/webhook", headers=caller.headers)
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert (await http.get("/v1/webhook", headers=caller.headers)).status_code == 404
        assert (await http.delete("/v1/webhook", headers=caller.headers)).status_code == 204
