"""Bearer tokens resolved through the principal cache: one query per token and TTL, then from memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from shared.auth import AUTH_LOOKUPS, Caller, PrincipalCache, caller_for_token, hash_token, new_token
from shared.db import create_engine, create_schema, session_factory
from shared.db.models import Principal
from shared.enums import Role
from shared.errors import Unauthenticated


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[AsyncSession]:
    """A session over a fresh SQLite database with the shared schema."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}")
    await create_schema(engine)
    async with session_factory(engine)() as s:
        yield s
    await engine.dispose()


async def _principal(session: AsyncSession) -> tuple[Principal, str]:
    token = new_token()
    principal = Principal(id=uuid4(), name="site", role=Role.CLIENT, token_hash=hash_token(token))
    session.add(principal)
    await session.commit()
    return principal, token


def _lookups(source: str) -> float:
    return AUTH_LOOKUPS.value(source=source)


async def test_a_token_is_looked_up_once_per_ttl(session: AsyncSession) -> None:
    """The first request queries, the next ones within the TTL come from the cache, the same caller."""
    principal, token = await _principal(session)
    cache = PrincipalCache(ttl_s=30, clock=Clock())
    database, cached = _lookups("database"), _lookups("cache")
    first = await caller_for_token(session, token, cache)
    again = [await caller_for_token(session, token, cache) for _ in range(3)]
    assert first == Caller(id=principal.id, name="site", role=Role.CLIENT)
    assert type(first.role) is Role
    assert again == [first] * 3
    assert _lookups("database") - database == 1
    assert _lookups("cache") - cached == 3


async def test_a_deleted_principal_is_refused_once_its_entry_expires(session: AsyncSession) -> None:
    """A principal removed from the database keeps working only until its cached entry expires."""
    principal, token = await _principal(session)
    clock = Clock()
    cache = PrincipalCache(ttl_s=30, clock=clock)
    await caller_for_token(session, token, cache)
    await session.execute(delete(Principal).where(Principal.id == principal.id))
    await session.commit()
    clock.now += 29
    assert (await caller_for_token(session, token, cache)).id == principal.id
    clock.now += 2
    with pytest.raises(Unauthenticated):
        await caller_for_token(session, token, cache)


async def test_forget_drops_a_principal_at_once(session: AsyncSession) -> None:
    """`forget` (what a revoke calls) makes the next request go to the database, which refuses it."""
    principal, token = await _principal(session)
    cache = PrincipalCache(ttl_s=3600, clock=Clock())
    await caller_for_token(session, token, cache)
    await session.execute(delete(Principal).where(Principal.id == principal.id))
    await session.commit()
    cache.forget(principal.id)
    assert len(cache) == 0
    with pytest.raises(Unauthenticated):
        await caller_for_token(session, token, cache)


async def test_unknown_tokens_are_never_cached_and_ttl_zero_caches_nothing(session: AsyncSession) -> None:
    """An unknown token is refused every time (nothing remembered); with ttl 0 every request queries."""
    cache = PrincipalCache(ttl_s=30, clock=Clock())
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await caller_for_token(session, "fh_unknown", cache)
    assert len(cache) == 0
    _, token = await _principal(session)
    off = PrincipalCache(ttl_s=0)
    database = _lookups("database")
    for _ in range(2):
        await caller_for_token(session, token, off)
    assert _lookups("database") - database == 2
    assert len(off) == 0


def test_the_least_recently_used_entry_goes_first() -> None:
    """Beyond `size` entries the one used longest ago is dropped; a hit counts as a use."""
    cache = PrincipalCache(ttl_s=30, size=2, clock=Clock())
    callers = {name: Caller(id=uuid4(), name=name, role=Role.CLIENT) for name in "abc"}
    cache.put("a", callers["a"])
    cache.put("b", callers["b"])
    assert cache.get("a") == callers["a"]
    cache.put("c", callers["c"])
    assert cache.get("b") is None
    assert cache.get("a") == callers["a"]
    assert cache.get("c") == callers["c"]
