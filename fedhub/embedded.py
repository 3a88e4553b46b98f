"""Embedded mode: the four services in one process over SQLite, a local blob folder and the in-memory bus.

`EmbeddedServer` is what `fedhub demo` and the end-to-end tests run: a real uvicorn server on
127.0.0.1 (a free port) in front of the API with the notifier's routes, plus the orchestrator and
the aggregator consuming the in-memory bus. The same service code runs in distributed mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import uvicorn
from pydantic import Field

from services.aggregator.service import Aggregator
from services.aggregator.settings import AggregatorSettings
from services.api.main import create_app, http_protocol
from services.api.settings import ApiSettings
from services.notifier import models as _notifier_tables  # noqa: F401 - registers its tables for create_schema
from services.notifier.direct import stream_first
from services.notifier.service import Notifier
from services.notifier.settings import NotifierSettings
from services.orchestrator.service import Orchestrator
from services.orchestrator.settings import OrchestratorSettings
from shared.runtime import Runtime, freeze_startup_heap
from shared.settings import CommonSettings


class EmbeddedSettings(CommonSettings):
    """One process, everything local. `data_dir` holds the SQLite file and the blob folder."""

    data_dir: Path = Field(default=Path(".fedhub"), description="where the database and blobs live")
    admin_token: str = Field(default_factory=lambda: "fh_admin_" + secrets.token_urlsafe(24))
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, description="0 picks a free port")
    deadline_tick_s: float = 0.5
    keepalive_s: float = 15.0
    idle_connection_s: int = Field(default=75, ge=1, description="idle HTTP connections stay open this long")

    def common(self) -> dict[str, Any]:
        """The shared settings every service gets, with paths under `data_dir`."""
        return {
            "database_url": f"sqlite+aiosqlite:///{self.data_dir / 'fedhub.db'}",
            "blob_path": self.data_dir / "blobs",
            "log_format": self.log_format,
            "log_level": self.log_level,
            "outbox_poll_s": self.outbox_poll_s,
        }


class EmbeddedServer:
    """`async with EmbeddedServer(settings) as server:` runs fedhub until the block ends."""

    def __init__(self, settings: EmbeddedSettings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._notifier: Notifier
        self.port = settings.port

    @property
    def base_url(self) -> str:
        """Where clients reach the API."""
        return f"http://{self.settings.host}:{self.port}"

    @property
    def events_url(self) -> str:
        """Where `/v1/events` is served: the same server in embedded mode."""
        return self.base_url

    @property
    def admin_token(self) -> str:
        """The bootstrap actor's token."""
        return self.settings.admin_token

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        s = self.settings
        common = s.common()
        runtime = await Runtime.open(CommonSettings(**common), create_tables=True)
        self.runtime = runtime
        self._stack.push_async_callback(runtime.close)

        orchestrator = Orchestrator(
            OrchestratorSettings(**common, deadline_tick_s=s.deadline_tick_s), runtime
        )
        aggregator = Aggregator(AggregatorSettings(**common), runtime)
        notifier = Notifier(NotifierSettings(**common, keepalive_s=s.keepalive_s), runtime)
        api_settings = ApiSettings(**common, admin_token=s.admin_token)
        app = create_app(api_settings, runtime)
        notifier.serve_on(app)

        for service in (orchestrator, aggregator, notifier):
            await service.start()
            self._stack.push_async_callback(service.stop)
        self._notifier = notifier

        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP.
        # Without it, Nagle holds each answer's body until the client's delayed ACK of its headers
        # (40 ms per request on Linux).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.host, s.port))
        self.port = sock.getsockname()[1]
        api_http = http_protocol(api_settings, app)
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=3,
            access_log=False,
            timeout_keep_alive=s.idle_connection_s,
            http=(
                stream_first(lambda: notifier.stream, http=api_http)
                if notifier.settings.socket_streams
                else api_http
            ),
        )
        self._server = uvicorn.Server(config)
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[sock]), name="uvicorn")
        self._stack.push_async_callback(self._stop_http, sock)
        while not self._server.started:
            if self._serve_task.done():
                self._serve_task.result()  # surfaces why uvicorn did not start
            await asyncio.sleep(0.01)
        freeze_startup_heap()

    async def _stop_http(self, sock: socket.socket) -> None:
        if self._server is not None and self._serve_task is not None:
            self._server.should_exit = True
            # Open event streams would hold uvicorn's graceful shutdown: end them first.
            await self._notifier.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        sock.close()
