"""`/healthz`, `/readyz` and `/metrics` for worker processes that serve no other HTTP (orchestrator,
aggregator).

A deliberately tiny HTTP/1.1 responder on asyncio streams: probes need two fixed answers and the
metrics one text, not a framework. The API and the notifier answer the same paths from their apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.bus.base import Bus
from shared.metrics import CONTENT_TYPE, REGISTRY

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, else why not."""


def database_check(engine: AsyncEngine) -> ReadinessCheck:
    """Ready when the database answers `SELECT 1`."""

    async def check() -> str | None:
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            return f"database unreachable: {type(exc).__name__}: {exc}"
        return None

    return check


def bus_check(bus: Bus) -> ReadinessCheck:
    """Ready while the bus is connected to its broker."""

    async def check() -> str | None:
        return bus.problem()

    return check


class HealthServer:
    """Serves liveness (always 200 while the loop runs), readiness (every check passes) and metrics."""

    def __init__(self, host: str, port: int, checks: list[ReadinessCheck]) -> None:
        self.host = host
        self.port = port
        self._checks = checks
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; with port 0 the chosen port is in `self.port` afterwards."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, content_type, payload = "200 OK", CONTENT_TYPE, REGISTRY.exposition().encode()
            else:
                status, body = await self._answer(path)
                content_type, payload = "application/json", json.dumps(body).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, path: str) -> tuple[str, dict[str, str]]:
        if path == "/healthz":
            return "200 OK", {"status": "ok"}
        if path == "/readyz":
            for check in self._checks:
                problem = await check()
                if problem is not None:
                    return "503 Service Unavailable", {"error": "NotReady", "detail": problem}
            return "200 OK", {"status": "ready"}
        return "404 Not Found", {"error": "NotFound", "detail": f"no route {path}"}
