"""A scripted fedhub server on a real HTTP socket (aiohttp, in a thread of its own), and helpers to
script it. Requests are recorded, and answers scripted, as httpx's plain data classes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import httpx
import torch
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

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
StreamStep = bytes | BaseException | Hang | httpx.Response

CUT_AFTER_S = 0.2
"""How long a stream script waits before it cuts the connection (an error step)."""


class ToPort(AbstractResolver):
    """Resolves every host name to 127.0.0.1:`port`, so the tests' URLs (`http://fedhub.test`) reach
    the scripted server (or, for a port nobody listens on, nothing)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host="127.0.0.1", port=self.port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


def session_to(port: int, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session whose every request goes to 127.0.0.1:`port`, whatever the URL's host."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=ToPort(port)), **kwargs)


def closed_port() -> int:
    """A local port nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ScriptedServer:
    """Answers each (method, path) from a queue and each `/v1/events` connection from a stream script.

    It serves real HTTP on 127.0.0.1:`port` from a thread and loop of its own (so that a client's
    `run_sync` loop reaches it too). A request nobody scripted is answered 500 and kept in `errors`;
    the `server` fixture fails the test when any is left there.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], deque[Responder]] = {}
        self.streams: deque[list[StreamStep]] = deque()
        self.errors: list[str] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def on(self, method: str, path: str, *responses: Responder) -> None:
        """Queue the answers to `method path`, used in order."""
        self.routes.setdefault((method, path), deque()).extend(responses)

    def stream(self, *steps: StreamStep) -> None:
        """Script the next `/v1/events` connection: chunks to send, an error (the connection is cut),
        a hang, or a whole response to answer instead of a stream."""
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

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """An aiohttp session whose requests all come here."""
        return session_to(self.port, **kwargs)

    def start(self) -> None:
        """Serve from a new thread; returns once the port is bound."""
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(ready),), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the scripted server did not start")

    def stop(self) -> None:
        """Stop serving (hanging streams are cut) and wait for the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    async def _serve(self, ready: threading.Event) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a client that closes its stream ends the hanging handler with it.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _handle(self, raw: web.Request) -> web.StreamResponse:
        body = await raw.read()
        request = httpx.Request(raw.method, str(raw.url), headers=list(raw.headers.items()), content=body)
        self.requests.append(request)
        if request.url.path == "/v1/events":
            if not self.streams:
                return self._unscripted(request)
            return await self._play(raw, self.streams.popleft())
        queue = self.routes.get((request.method, request.url.path))
        if not queue:
            return self._unscripted(request)
        answer = queue.popleft()
        return _to_aiohttp(answer(request) if callable(answer) else answer)

    def _unscripted(self, request: httpx.Request) -> web.Response:
        self.errors.append(f"unscripted request {request.method} {request.url}")
        return web.json_response({"error": "Unscripted", "detail": self.errors[-1]}, status=500)

    @staticmethod
    async def _play(raw: web.Request, steps: list[StreamStep]) -> web.StreamResponse:
        if len(steps) == 1 and isinstance(steps[0], httpx.Response):
            return _to_aiohttp(steps[0])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(raw)
        for step in steps:
            if isinstance(step, BaseException):
                # The connection breaks mid-stream, once the client has read what came before (a
                # client's HTTP library may drop what it had buffered when the connection breaks).
                await asyncio.sleep(CUT_AFTER_S)
                assert raw.transport is not None
                raw.transport.abort()
                return response
            if isinstance(step, Hang):
                await asyncio.Event().wait()
            else:
                assert isinstance(step, bytes)
                await response.write(step)
        await response.write_eof()
        return response


def _to_aiohttp(answer: httpx.Response) -> web.Response:
    headers = {
        k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding")
    }
    return web.Response(status=answer.status_code, body=answer.content, headers=headers)
