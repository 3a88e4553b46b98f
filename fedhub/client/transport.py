"""HTTP to a fedhub server: bearer auth, retries with backoff, errors turned into `ClientError`."""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from typing import Any

import httpx
import structlog

from fedhub.client.errors import ServerUnreachable, error_from_response
from fedhub.client.retry import RetryPolicy

log = structlog.get_logger(component="fedhub.client")

MSGPACK = "application/msgpack"

# Long enough for a large model upload on a slow link; connecting should never take long.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


@functools.cache
def shared_tls() -> ssl.SSLContext:
    """httpx's default verifying TLS context, made once per process and shared by every client the
    SDK makes: building one loads the CA certificates, ~40 ms here, so 1,000 clients simulated in
    one process spent ~40 s before their first request."""
    return httpx.create_ssl_context()


def is_retryable_status(status_code: int) -> bool:
    """5xx and 429 may go away on their own; every other status is the server's final word."""
    return status_code == 429 or status_code >= 500


class Transport:
    """One server, one token: builds URLs, sends requests, retries what may be retried."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        http: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self.http = (
            http if http is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT, verify=shared_tls())
        )
        self._auth = {"Authorization": f"Bearer {token}"}

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
    ) -> httpx.Response:
        """Send a request and return its 2xx response; raise `ClientError` otherwise.

        Idempotent requests are retried on connection errors, 5xx and 429. The others (creating a
        principal, a training) only when the server surely did not act: the connection never
        opened, or it answered 429.
        """
        url = self.url(path)
        attempts = self.retry.attempts
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self.http.request(
                    method, url, json=json, content=content, headers=self.headers(headers), params=params
                )
            except httpx.TransportError as exc:
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if last or not (idempotent or never_sent):
                    raise ServerUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                delay = self.retry.delay(attempt)
                log.warning(
                    "http.retrying", method=method, path=path, error=type(exc).__name__, delay_s=delay
                )
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response
            status = response.status_code
            if last or not is_retryable_status(status) or not (idempotent or status == 429):
                if is_retryable_status(status):
                    error = error_from_response(response)
                    raise ServerUnreachable(f"{method} {path}: {error}", status_code=status)
                raise error_from_response(response)
            delay = max(self.retry.delay(attempt), self._retry_after(response))
            log.warning("http.retrying", method=method, path=path, status=status, delay_s=delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retry_after(self, response: httpx.Response) -> float:
        """The server's `Retry-After` in seconds (numeric form only), never beyond the policy's cap."""
        value = response.headers.get("Retry-After", "")
        try:
            return min(max(float(value), 0.0), self.retry.cap)
        except ValueError:
            return 0.0

    async def aclose(self) -> None:
        """Close the HTTP client if this transport created it."""
        if self._owns_http:
            await self.http.aclose()
