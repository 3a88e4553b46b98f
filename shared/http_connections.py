"""Moving an HTTP connection from one asyncio protocol to another while it is open.

The notifier's event streams (`services.notifier.direct`) and the API's parked connections
(`services.api.connections`) look at a request's bytes before uvicorn's protocol does, and give
the connection to a fresh uvicorn protocol when it is uvicorn's to serve.
"""

from __future__ import annotations

import asyncio


def hand_over(transport: asyncio.Transport, protocol: asyncio.Protocol, read: bytes) -> None:
    """Make `protocol` the connection's from here on, as if it had read `read` from the start."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if read:
        protocol.data_received(read)
