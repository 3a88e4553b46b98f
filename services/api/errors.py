"""Errors only the HTTP API raises; each names what happened and maps to one status."""

from __future__ import annotations

from shared.errors import FedhubError


class UnsupportedMediaType(FedhubError):
    """A body came with a content type the endpoint does not read."""

    status_code = 415


class PayloadTooLarge(FedhubError):
    """A body is larger than the configured upload limit."""

    status_code = 413


class ValidationError(FedhubError):
    """A well-formed request breaks a rule (duplicate ids, a count out of range, a bad field)."""

    status_code = 422
