"""At most `limit` requests of the API are worked on at once; the rest wait their turn, in order.

With 1,000 clients uploading at the same moment every request was in flight at once, each with its
session, parsed body, blob write and framework state: the API's memory grew with the number of
clients (109 MiB at 10, 168 MiB at 1,000). Behind the gate a waiting request holds only its
connection and task: its body is not read (flow control keeps it in the socket) until its turn.
The server is busy either way, so the work done per second is the same. Event streams (they last
as long as a client listens) and probes never wait.

One `Slots` serves the whole app: the middleware (`ConcurrencyGate`) and the report routes' short
lane (`services.api.lane`) take their turns from the same slots. Served by `fedhub api` or the
embedded server, requests meet a gate below this one first (`services.api.connections`): there a
waiting request is not even read, and requests other than the clients' reports have fewer slots.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Receive, Scope, Send

from shared.metrics import REGISTRY

WAITING = REGISTRY.histogram(
    "fedhub_api_gate_wait_seconds",
    "Time a request waited at the API's concurrency gate (FEDHUB_MAX_CONCURRENT_REQUESTS)",
)

UNGATED = ("/v1/events", "/healthz", "/readyz", "/metrics")
"""Path prefixes that pass the gate at once."""


class Slots:
    """A FIFO semaphore of `limit` request slots (the wait of a request that found none is timed)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the gate needs a limit of at least 1")
        self._free = asyncio.Semaphore(limit)

    async def acquire(self) -> None:
        """Take a slot, waiting in arrival order for one to free when all are taken."""
        if self._free.locked():
            with WAITING.time():
                await self._free.acquire()
        else:
            await self._free.acquire()

    def release(self) -> None:
        """Give a slot back."""
        self._free.release()


class ConcurrencyGate:
    """Pure ASGI middleware: one of `slots` around every gated HTTP request."""

    def __init__(self, app: ASGIApp, *, slots: Slots) -> None:
        self.app = app
        self._slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Wait for a slot (unless ungated), then run the request; the slot frees when it ends."""
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(UNGATED):
            await self.app(scope, receive, send)
            return
        await self._slots.acquire()
        try:
            await self.app(scope, receive, send)
        finally:
            self._slots.release()
