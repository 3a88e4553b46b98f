"""HTTP to a fedhub server: bearer auth, retries with backoff, errors turned into `ClientError`.

The SDK speaks HTTP with aiohttp: per request it costs the client a fifth of the CPU httpx does
(`bench/client_http.py`: 0.21 against 1.03 ms with 1,000 clients posting at once), which decides how
many clients one process can simulate.
"""

from __future__ import annotations

import asyncio
import functools
import json as jsonlib
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from fedhub.client.errors import ServerUnreachable, error_from_response
from fedhub.client.retry import RetryPolicy

log = structlog.get_logger(component="fedhub.client")

MSGPACK = "application/msgpack"

# Long enough for a large model upload on a slow link; connecting should never take long.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=120.0)

TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
"""What a request raises when the server could not be reached or the connection broke."""

NEVER_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
"""Transport errors that mean the request never left: safe to retry whatever it was."""


@functools.cache
def shared_tls() -> ssl.SSLContext:
    """A verifying TLS context, made once per process and shared by every session the SDK makes:
    building one loads the CA certificates, ~40 ms here, so 1,000 clients simulated in one process
    would spend ~40 s before their first request."""
    return ssl.create_default_context()


def new_session(
    *,
    timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
    limit: int = 100,
    trace_configs: Sequence[aiohttp.TraceConfig] = (),
) -> aiohttp.ClientSession:
    """The HTTP session a client or transport makes for itself when it is given none (at most
    `limit` connections at once); the benchmarks make theirs here too, with their own timeouts."""
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=limit, ssl=shared_tls()),
        trace_configs=list(trace_configs) or None,
    )


def is_retryable_status(status_code: int) -> bool:
    """5xx and 429 may go away on their own; every other status is the server's final word."""
    return status_code == 429 or status_code >= 500


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole HTTP answer, read before its connection went back to the pool."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def is_success(self) -> bool:
        """2xx."""
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        """The body as UTF-8 text (undecodable bytes replaced)."""
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON (`ValueError` when it is not)."""
        return jsonlib.loads(self.content)

    @classmethod
    async def read(cls, response: aiohttp.ClientResponse) -> Reply:
        """Read `response` whole."""
        return cls(response.status, response.headers, await response.read())


class Transport:
    """One server, one token: builds URLs, sends requests, retries what may be retried.

    `http` is an `aiohttp.ClientSession` to send with (left open); without one the transport makes
    its own on first use (inside the running event loop) and closes it in `aclose`.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        http: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self._http = http
        self._auth = {"Authorization": f"Bearer {token}"}

    @property
    def http(self) -> aiohttp.ClientSession:
        """The session requests go through."""
        if self._http is None:
            self._http = new_session()
        return self._http

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as `/v1/me` (an absolute URL is kept as it is)."""
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + path

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The auth header plus `extra`."""
        return {**self._auth, **(extra or {})}

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> Reply:
        """Send a request and return its 2xx answer; raise `ClientError` otherwise.

        Idempotent requests are retried on connection errors, 5xx and 429. The others (creating a
        principal, a training) only when the server surely did not act: the connection never
        opened, or it answered 429.
        """
        url = self.url(path)
        attempts = self.retry.attempts
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                async with self.http.request(
                    method,
                    url,
                    json=json,
                    data=content,
                    headers=self.headers(headers),
                    params=params,
                    allow_redirects=False,
                ) as response:
                    reply = await Reply.read(response)
            except TRANSPORT_ERRORS as exc:
                if last or not (idempotent or isinstance(exc, NEVER_SENT)):
                    raise ServerUnreachable(f"{method} {path}: {describe(exc)}") from exc
                delay = self.retry.delay(attempt)
                log.warning(
                    "http.retrying", method=method, path=path, error=type(exc).__name__, delay_s=delay
                )
                await asyncio.sleep(delay)
                continue
            if reply.is_success:
                return reply
            status = reply.status_code
            if last or not is_retryable_status(status) or not (idempotent or status == 429):
                if is_retryable_status(status):
                    error = error_from_response(reply)
                    raise ServerUnreachable(f"{method} {path}: {error}", status_code=status)
                raise error_from_response(reply)
            delay = max(self.retry.delay(attempt), self._retry_after(reply))
            log.warning("http.retrying", method=method, path=path, status=status, delay_s=delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_after(self, reply: Reply) -> float:
        """The server's `Retry-After` in seconds (numeric form only), never beyond the policy's cap."""
        value = reply.headers.get("Retry-After", "")
        try:
            return min(max(float(value), 0.0), self.retry.cap)
        except ValueError:
            return 0.0

    async def aclose(self) -> None:
        """Close the HTTP session if this transport made it."""
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None


def describe(exc: BaseException) -> str:
    """`Type: message` of a transport error (a bare timeout has no message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
