"""Webhook signatures: `X-Fedhub-Signature: sha256=<hex hmac_sha256(secret, "<timestamp>.<body>")>`.

Standard library only, so a receiver can copy or import it without the service.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_PREFIX = "sha256="


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Fedhub-Signature` value for `body` sent at `timestamp` (unix seconds, as sent)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_s: float | None = None,
    now: float | None = None,
) -> bool:
    """Whether `signature` signs `body` at `timestamp` with `secret` (constant-time comparison).

    With `tolerance_s`, a timestamp further than that from `now` (default: the clock) fails too,
    which stops a captured request from being replayed later.
    """
    if tolerance_s is not None:
        try:
            sent = int(timestamp)
        except ValueError:
            return False
        if abs((time.time() if now is None else now) - sent) > tolerance_s:
            return False
    expected = sign(secret, timestamp, body).encode()
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))
