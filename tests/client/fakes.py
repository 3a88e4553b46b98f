"""A scripted fedhub server behind `httpx.MockTransport`, and helpers to script it."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID, uuid4

import httpx
import torch

from fedhub.client import RetryPolicy
from shared.codec import encode_tensors
from shared.tensors import state_dict_to_records

FAST = RetryPolicy(attempts=3, base=0.0, cap=0.0)
"""Retries without waiting, so tests never sleep."""


class Hang:
    """A stream script step: keep the connection open, sending nothing, until the client closes it."""


def sse(seq: int, kind: str, training_id: UUID, **body: Any) -> bytes:
    """One notification framed as the server sends it."""
    data = {
        "event_id": str(uuid4()),
        "notification_type": kind,
        "training_uuid": str(training_id),
        "body": {k: str(v) if isinstance(v, UUID) else v for k, v in body.items()},
        "timestamp": "2025-01-01T00:00:00+00:00",
    }
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


def weights_response(state: dict[str, torch.Tensor]) -> httpx.Response:
    """`GET /v1/models/{id}/weights` answering `state` as msgpack."""
    return httpx.Response(
        200,
        content=encode_tensors(state_dict_to_records(state)),
        headers={"Content-Type": "application/msgpack"},
    )


def error_response(status: int, error: str, detail: str) -> httpx.Response:
    """An API error in the contract's shape."""
    return httpx.Response(status, json={"error": error, "detail": detail})


Responder = httpx.Response | Callable[[httpx.Request], httpx.Response]


class ScriptedServer:
    """Answers each (method, path) from a queue and each `/v1/events` connection from a stream script.

    A request nobody scripted fails the test (the handler raises, and the SDK does not swallow it).
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], deque[Responder]] = {}
        self.streams: deque[list[bytes | BaseException | Hang]] = deque()

    def on(self, method: str, path: str, *responses: Responder) -> None:
        """Queue the answers to `method path`, used in order."""
        self.routes.setdefault((method, path), deque()).extend(responses)

    def stream(self, *steps: bytes | BaseException | Hang) -> None:
        """Script the next `/v1/events` connection: chunks to send, an error to raise, or a hang."""
        self.streams.append(list(steps))

    @property
    def calls(self) -> list[str]:
        """Every request so far as `METHOD /path`."""
        return [f"{r.method} {r.url.path}" for r in self.requests]

    def requests_to(self, method: str, path: str) -> list[httpx.Request]:
        """The requests sent to one route."""
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def unused(self) -> dict[str, int]:
        """Scripted answers nobody asked for."""
        unused = {f"{m} {p}": len(q) for (m, p), q in self.routes.items() if q}
        if self.streams:
            unused["GET /v1/events"] = len(self.streams)
        return unused

    async def handler(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport entry point."""
        await request.aread()
        self.requests.append(request)
        if request.url.path == "/v1/events":
            if not self.streams:
                raise AssertionError("unscripted /v1/events connection")
            steps = self.streams.popleft()
            return httpx.Response(
                200, headers={"Content-Type": "text/event-stream"}, content=self._play(steps)
            )
        queue = self.routes.get((request.method, request.url.path))
        if not queue:
            raise AssertionError(f"unscripted request {request.method} {request.url}")
        answer = queue.popleft()
        return answer(request) if callable(answer) else answer

    @staticmethod
    async def _play(steps: list[bytes | BaseException | Hang]) -> AsyncIterator[bytes]:
        for step in steps:
            if isinstance(step, BaseException):
                raise step
            if isinstance(step, Hang):
                await asyncio.Event().wait()
            else:
                yield step
