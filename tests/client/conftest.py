"""Fixtures for the SDK's protocol tests: a scripted server and an httpx client wired to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from .fakes import ScriptedServer


@pytest.fixture
def server() -> ScriptedServer:
    """A fresh scripted server."""
    return ScriptedServer()


@pytest.fixture
async def http(server: ScriptedServer) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client whose every request goes to `server`."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(server.handler)) as client:
        yield client
