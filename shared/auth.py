"""Bearer tokens: generated once, stored only as SHA-256, looked up in one indexed query (then cached)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from uuid import UUID, uuid5

from sqlalchemy import Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import Principal
from shared.enums import Role
from shared.errors import Unauthenticated
from shared.lru import Lru
from shared.metrics import REGISTRY

_ADMIN_NAMESPACE = UUID("6f1c2a4e-3b7d-4c59-9e0a-0d5b8f3e2a11")


def new_token() -> str:
    """A fresh random bearer token."""
    return "fh_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token (tokens are random, so a plain SHA-256 suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def admin_principal_id(token: str) -> UUID:
    """The stable principal id of the bootstrap actor that `token` configures."""
    return uuid5(_ADMIN_NAMESPACE, hash_token(token))


async def ensure_admin(session: AsyncSession, token: str) -> Principal:
    """Create the bootstrap actor for the configured admin token if it does not exist yet."""
    pid = admin_principal_id(token)
    found = await session.get(Principal, pid)
    if found is not None:
        return found
    principal = Principal(id=pid, name="admin", role=Role.ACTOR, token_hash=hash_token(token))
    session.add(principal)
    await session.flush()
    return principal


def bearer_token(authorization: str | None) -> str:
    """Extract the token of an `Authorization: Bearer ...` header."""
    if not authorization:
        raise Unauthenticated("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization header must be 'Bearer <token>'")
    return token.strip()


AUTH_LOOKUPS = REGISTRY.counter(
    "fedhub_auth_lookups_total",
    "Bearer tokens resolved: from the principal cache, from the database, or unknown",
    ("source",),
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the principal its token belongs to (a snapshot, not a row)."""

    id: UUID
    name: str
    role: Role


class PrincipalCache:
    """Callers by token hash, each kept `ttl_s` seconds, at most `size` of them (least recently used
    go first): one query per token and TTL instead of one per request.

    The API never changes a principal once created (there is no revoke yet), so a cached caller is
    what the database says; a change made elsewhere shows within `ttl_s`. `forget` drops a
    principal's entries at once, for the code that changes or revokes one. Unknown tokens are not
    cached. `ttl_s` 0 turns the cache off.
    """

    def __init__(self, ttl_s: float = 30.0, size: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.size = size
        self._clock = clock
        self._entries: Lru[str, tuple[Caller, float]] = Lru(size)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token_hash: str) -> Caller | None:
        """The cached caller of a token hash, None when absent or expired."""
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        caller, expires = entry
        if self._clock() >= expires:
            self._entries.pop(token_hash)
            return None
        return caller

    def put(self, token_hash: str, caller: Caller) -> None:
        """Remember `caller` for `ttl_s` seconds."""
        if self.ttl_s <= 0:
            return
        self._entries.put(token_hash, (caller, self._clock() + self.ttl_s))

    def forget(self, principal_id: UUID) -> None:
        """Drop every cached token of `principal_id` (after changing or revoking it)."""
        for token_hash, (caller, _) in self._entries.items():
            if caller.id == principal_id:
                self._entries.pop(token_hash)


_PRINCIPALS = cast(Table, Principal.__table__)
_CALLER_BY_HASH = select(_PRINCIPALS.c.id, _PRINCIPALS.c.name, _PRINCIPALS.c.role).where(
    _PRINCIPALS.c.token_hash == bindparam("token_hash")
)
"""One Core statement, built once, for the three columns a `Caller` needs: the ORM entity query it
replaces was built per lookup and loaded a whole `Principal` (at 1,000 clients, the round in which
their cached callers expire cost the API 3-4x a cached round)."""


async def caller_for_token(session: AsyncSession, token: str, cache: PrincipalCache | None = None) -> Caller:
    """Who a token belongs to, from `cache` when it knows, else by one query; `Unauthenticated` if none."""
    token_hash = hash_token(token)
    if cache is not None and (cached := cache.get(token_hash)) is not None:
        AUTH_LOOKUPS.inc(source="cache")
        return cached
    row = (await session.execute(_CALLER_BY_HASH, {"token_hash": token_hash})).first()
    if row is None:
        AUTH_LOOKUPS.inc(source="unknown")
        raise Unauthenticated("unknown bearer token")
    AUTH_LOOKUPS.inc(source="database")
    caller = Caller(id=row.id, name=row.name, role=row.role)
    if cache is not None:
        cache.put(token_hash, caller)
    return caller
