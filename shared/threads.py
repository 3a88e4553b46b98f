"""Where a piece of CPU work runs: on the event loop when it is small, in a worker thread otherwise.

A hop to a worker thread costs the loop more than a few hundred microseconds of work (waking the
thread, the GIL going back and forth, the result waiting for the loop's next turn), while large work
run on the loop stalls every other request. Callers decide what "small" is for their work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


async def off_loop(inline: bool, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn` on the event loop when `inline` (small work), else in a worker thread."""
    if inline:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)
