"""Fixtures for the SDK's protocol tests: a scripted server on a real socket and a session to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from .fakes import ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A fresh scripted server, serving; the test fails if a request went unscripted."""
    scripted = ScriptedServer()
    scripted.start()
    yield scripted
    scripted.stop()
    assert scripted.errors == []


@pytest.fixture
async def http(server: ScriptedServer) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session whose every request goes to `server`."""
    async with server.session() as session:
        yield session
