"""`sign` / `verify`: the documented HMAC, constant-time check, optional timestamp tolerance."""

from __future__ import annotations

import hashlib
import hmac

from services.notifier.signing import sign, verify


def test_sign_is_the_documented_hmac():
    """`sha256=` + hex HMAC-SHA256 of `"<timestamp>.<body>"` keyed by the secret."""
    expected = hmac.new(b"k" * 16, b"1700000000.{}", hashlib.sha256).hexdigest()
    assert sign("k" * 16, "1700000000", b"{}") == f"sha256={expected}"


def test_verify_rejects_tampering():
    """Another secret, body, timestamp or a malformed signature fails."""
    signature = sign("secret-secret-16", "100", b'{"a":1}')
    assert verify("secret-secret-16", "100", b'{"a":1}', signature)
    assert not verify("secret-secret-17", "100", b'{"a":1}', signature)
    assert not verify("secret-secret-16", "101", b'{"a":1}', signature)
    assert not verify("secret-secret-16", "100", b'{"a":2}', signature)
    assert not verify("secret-secret-16", "100", b'{"a":1}', "sha256=zz\u00e9")


def test_verify_tolerance():
    """With `tolerance_s`, an old or malformed timestamp fails even when the signature matches."""
    signature = sign("secret-secret-16", "1000", b"x")
    assert verify("secret-secret-16", "1000", b"x", signature, tolerance_s=60, now=1030)
    assert not verify("secret-secret-16", "1000", b"x", signature, tolerance_s=60, now=1100)
    bad = sign("secret-secret-16", "soon", b"x")
    assert not verify("secret-secret-16", "soon", b"x", bad, tolerance_s=60, now=1000)
