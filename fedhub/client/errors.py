"""Errors the SDK raises: what the server answered, or that it could not be reached."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedhub.client.transport import Reply


class ClientError(Exception):
    """The server refused a request; `error` and `detail` are its wire error name and explanation."""

    def __init__(self, status_code: int | None, error: str, detail: str) -> None:
        super().__init__(f"{error} ({status_code}): {detail}" if status_code else f"{error}: {detail}")
        self.status_code = status_code
        self.error = error
        self.detail = detail


class ServerUnreachable(ClientError):
    """Every attempt failed with a connection error or a retryable status."""

    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(status_code, "ServerUnreachable", detail)


def error_from_response(response: Reply) -> ClientError:
    """The `ClientError` for an error response (`{"error", "detail"}`, or whatever else it holds)."""
    error = f"HTTP{response.status_code}"
    detail = response.text[:500]
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("error"), str):
            error = body["error"]
        if "detail" in body:
            detail = body["detail"] if isinstance(body["detail"], str) else str(body["detail"])
    return ClientError(response.status_code, error, detail)
