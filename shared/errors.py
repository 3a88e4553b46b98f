"""The base exception of fedhub and the errors every service may raise.

Each error is named for what happened, carries its ids in `detail`, and maps to one HTTP status.
"""

from __future__ import annotations


class FedhubError(Exception):
    """Base of every fedhub error; `status_code` is what the API answers when it escapes a request."""

    status_code: int = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def name(self) -> str:
        """The error's wire name, e.g. `RoundClosed`."""
        return type(self).__name__


class MalformedPayload(FedhubError):
    """A body could not be decoded (not msgpack, not JSON, wrong structure)."""


class UnsupportedDtype(FedhubError):
    """A tensor names a dtype fedhub does not carry."""


class TensorSpecMismatch(FedhubError):
    """An update's tensors do not match the model's names, shapes or dtypes."""

    status_code = 422


class NonFiniteValues(FedhubError):
    """A floating tensor holds NaN or Inf."""

    status_code = 422


class NotFound(FedhubError):
    """A resource does not exist (or is not visible to the caller)."""

    status_code = 404


class Unauthenticated(FedhubError):
    """No valid bearer token."""

    status_code = 401


class Forbidden(FedhubError):
    """The caller's role or identity may not do this."""

    status_code = 403


class Conflict(FedhubError):
    """The request contradicts the current state (e.g. a second start)."""

    status_code = 409


class IllegalTransition(Conflict):
    """A training cannot move from its current state or phase by this action."""


class RoundClosed(Conflict):
    """An upload or report names a round that is not the open one."""


class NotAParticipant(FedhubError):
    """The client is not a participant of the training."""

    status_code = 403
