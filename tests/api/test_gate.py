"""The API's concurrency gate: at most `limit` requests worked on at once, the rest in order after
them; event streams and probes pass at once."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from services.api.gate import ConcurrencyGate, Slots


class Recorder:
    """An ASGI app that notes how many requests run at once and holds each until released."""

    def __init__(self) -> None:
        self.slow_running = 0
        self.most_slow = 0
        self.release = asyncio.Event()
        self.two_started = asyncio.Event()
        self.started: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        slow = scope["path"].startswith("/slow")
        self.started.append(scope["path"])
        if slow:
            self.slow_running += 1
            self.most_slow = max(self.most_slow, self.slow_running)
            if self.slow_running == 2:
                self.two_started.set()
        try:
            if slow:
                await self.release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        finally:
            if slow:
                self.slow_running -= 1


async def test_at_most_limit_requests_run_the_rest_wait_in_order() -> None:
    app = Recorder()
    gate = ConcurrencyGate(app, slots=Slots(2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://api") as http:
        requests = [asyncio.create_task(http.get(f"/slow/{i}")) for i in range(6)]
        await asyncio.wait_for(app.two_started.wait(), timeout=5)
        await asyncio.sleep(0.05)
        assert app.started == ["/slow/0", "/slow/1"]  # the others wait at the gate
        # An event stream and a probe pass a full gate.
        assert (await http.get("/v1/events")).status_code == 200
        assert (await http.get("/healthz")).status_code == 200
        app.release.set()
        answers = await asyncio.gather(*requests)
    assert [a.status_code for a in answers] == [200] * 6
    assert [p for p in app.started if p.startswith("/slow")] == [f"/slow/{i}" for i in range(6)]
    assert app.most_slow == 2


def test_a_gate_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)
