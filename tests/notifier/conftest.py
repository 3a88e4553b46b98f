"""Fixtures of the notifier tests: an embedded runtime on SQLite, principals, real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
import uvicorn

import services.notifier.models  # noqa: F401 - registers the notifier's tables before create_schema
from services.notifier.direct import stream_first
from services.notifier.service import Notifier, create_app, running
from services.notifier.settings import NotifierSettings
from services.notifier.sse import EventStream
from shared.auth import hash_token, new_token
from shared.db.models import Principal
from shared.enums import Role
from shared.events import NotificationIssued, NotificationType
from shared.runtime import Runtime
from shared.settings import CommonSettings

WAIT_S = 10.0
"""Upper bound on any wait for a condition; far below the per-test timeout."""


def common(tmp_path: Path) -> dict[str, Any]:
    """Common settings over a fresh SQLite file in `tmp_path`."""
    return {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        "blob_path": tmp_path / "blobs",
        "outbox_poll_s": 0.05,
    }


@pytest.fixture
def settings(tmp_path: Path) -> NotifierSettings:
    """Notifier settings with quick webhook retries."""
    return NotifierSettings(
        **common(tmp_path),
        webhook_backoff_base_s=0.05,
        webhook_backoff_max_s=0.2,
        webhook_poll_s=30.0,  # retries must come from wake-ups and due times, not polling
        webhook_timeout_s=5.0,
        shutdown_timeout_s=5.0,
    )


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    """An embedded runtime (SQLite, in-memory bus, outbox relay) with every table created."""
    rt = await Runtime.open(CommonSettings(**common(tmp_path)), create_tables=True)
    try:
        yield rt
    finally:
        await rt.close()


@dataclass(frozen=True)
class Caller:
    """A principal and its bearer token."""

    id: UUID
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of this caller."""
        return {"Authorization": f"Bearer {self.token}"}


async def make_principal(runtime: Runtime, name: str, role: Role = Role.CLIENT) -> Caller:
    """Create a principal directly in the database."""
    token = new_token()
    principal = Principal(name=name, role=role, token_hash=hash_token(token))
    async with runtime.uow() as uow:
        uow.session.add(principal)
        await uow.session.flush()
        pid = principal.id
    return Caller(pid, token)


def notification(
    receivers: Iterable[UUID],
    *,
    training_id: UUID | None = None,
    notification_type: NotificationType = NotificationType.UPDATE_ROUND_START,
    round: int = 1,
) -> NotificationIssued:
    """A notification whose body holds a UUID, as the orchestrator's do."""
    return NotificationIssued(
        event_id=uuid4(),
        notification_type=notification_type,
        training_id=training_id or uuid4(),
        receivers=tuple(receivers),
        body={"round": round, "global_model_uuid": uuid4()},
    )


async def emit(runtime: Runtime, message: NotificationIssued) -> NotificationIssued:
    """Emit through the outbox, so the real relay and bus carry it to the notifier."""
    async with runtime.uow() as uow:
        uow.emit(message)
    return message


def expected_payload(message: NotificationIssued) -> dict[str, Any]:
    """The contract payload, written out independently of the service's code."""
    return {
        "event_id": str(message.event_id),
        "notification_type": message.notification_type.value,
        "training_uuid": str(message.training_id),
        "body": {"round": message.body["round"], "global_model_uuid": str(message.body["global_model_uuid"])},
        "timestamp": message.issued_at.isoformat(),
    }


@contextlib.asynccontextmanager
async def serve(
    app: Any,
    *,
    before_exit: Callable[[], None] | None = None,
    server_class: type[uvicorn.Server] | None = None,
    http: type[asyncio.Protocol] | None = None,
) -> AsyncIterator[str]:
    """Run `app` on a real uvicorn server on a free 127.0.0.1 port; yield its base URL. `http`:
    uvicorn's protocol class (default: its own)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False, http=http or "auto")
    server = server_class(config) if server_class else uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(WAIT_S):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        if before_exit is not None:
            before_exit()
        server.should_exit = True
        async with asyncio.timeout(WAIT_S):
            await task
        sock.close()


@dataclass
class NotifierServer:
    """A running notifier: its URL, the service object and the runtime under it."""

    url: str
    notifier: Notifier
    runtime: Runtime
    served_by: str = "asgi"
    """What serves a stream that opens its connection: `socket` or `asgi` (see `served_by`)."""


@pytest.fixture(params=["socket", "asgi"])
def served_by(request: pytest.FixtureRequest) -> str:
    """How the notifier's uvicorn serves event streams: `socket` as `fedhub notifier` and the
    embedded server do (`direct.stream_first`), `asgi` as any ASGI server does (through the app)."""
    return str(request.param)


@pytest.fixture
def start_notifier(
    runtime: Runtime, settings: NotifierSettings, served_by: str
) -> Callable[..., contextlib.AbstractAsyncContextManager[NotifierServer]]:
    """A factory: `async with start_notifier(**overrides) as server:` serves the notifier over uvicorn."""

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[NotifierServer]:
        merged = settings.model_copy(update=overrides)
        app = create_app(merged, runtime)

        def streams() -> EventStream | None:
            notifier = running(app)
            return None if notifier is None else notifier.stream

        def end_streams() -> None:
            # uvicorn waits for open responses before the lifespan stops the notifier.
            notifier = running(app)
            if notifier is not None:
                notifier.end_streams()

        http = stream_first(streams) if served_by == "socket" else None
        async with serve(app, before_exit=end_streams, http=http) as url:
            yield NotifierServer(url, app.state.notifier, runtime, served_by)

    return start


@pytest.fixture
async def server(start_notifier: Callable[..., Any]) -> AsyncIterator[NotifierServer]:
    """The notifier with default settings, served over uvicorn."""
    async with start_notifier() as s:
        yield s


@dataclass(frozen=True)
class Event:
    """One parsed server-sent event."""

    id: int
    event: str
    data: dict[str, Any]


class SseReader:
    """Parses a `text/event-stream` response into events; comment lines are kept apart."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.comments: list[str] = []
        self._lines = response.aiter_lines()

    async def next(self) -> Event:
        """The next event; EOFError when the server ends the stream."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(WAIT_S):
            async for line in self._lines:
                if line == "":
                    if fields:
                        return Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                    continue
                if line.startswith(":"):
                    self.comments.append(line)
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        raise EOFError("stream ended")

    async def take(self, n: int) -> list[Event]:
        """The next `n` events."""
        return [await self.next() for _ in range(n)]

    async def until_comment(self, text: str) -> None:
        """Read until a comment line equal to `text` arrives."""
        async with asyncio.timeout(WAIT_S):
            async for line in self._lines:
                if line == text:
                    return
        raise EOFError("stream ended before the comment")

    async def until_end(self) -> list[Event]:
        """Read until the server ends the stream; return the events on the way."""
        events = []
        while True:
            try:
                events.append(await self.next())
            except EOFError:
                return events


@contextlib.asynccontextmanager
async def open_stream(
    url: str, *, headers: dict[str, str] | None = None, params: dict[str, str] | None = None
) -> AsyncIterator[SseReader]:
    """Open `GET /v1/events` and yield a reader once the response headers arrived."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0)) as client,
        client.stream("GET", "/v1/events", headers=headers, params=params) as response,
    ):
        assert response.status_code == 200, (response.status_code, await response.aread())
        yield SseReader(response)


async def wait_for(predicate: Callable[[], Any], what: str) -> Any:
    """Poll an async or sync predicate until it returns something truthy (or fail after WAIT_S)."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                result = predicate()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
