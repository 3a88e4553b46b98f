"""How the SDK retries: a bounded number of attempts with capped exponential backoff and jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**62 seconds is already far past any cap; bounding the exponent keeps the float finite.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Up to `attempts` tries; before retry `n` (0-based) wait a jittered `min(cap, base * 2**n)` seconds.

    The same policy bounds HTTP requests (connection errors, 5xx, 429) and event-stream reconnects
    (consecutive failed connects; a connection that succeeds resets the count).
    """

    attempts: int = 8
    base: float = 0.5
    cap: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base < 0 or self.cap < 0:
            raise ValueError(f"base and cap must be non-negative, got base={self.base} cap={self.cap}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry`: uniform in [ceiling / 2, ceiling].

        Half the ceiling is kept so that a burst of clients cut off together spread out without
        any of them hammering the server straight away.
        """
        ceiling = min(self.cap, self.base * 2 ** min(retry, _MAX_EXPONENT))
        return random.uniform(ceiling / 2, ceiling)
