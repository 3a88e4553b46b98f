"""The SDK codes small models on the event loop and large ones (and user callbacks) in a worker thread."""

from __future__ import annotations

import threading

from fedhub.client.client import INLINE_BYTES, _off_loop


async def test_small_payloads_stay_on_the_loop_and_large_ones_go_to_a_thread() -> None:
    """Up to INLINE_BYTES the function runs in the caller's thread; beyond, in another one."""
    here = threading.get_ident()
    assert await _off_loop(INLINE_BYTES, threading.get_ident) == here
    assert await _off_loop(INLINE_BYTES + 1, threading.get_ident) != here
