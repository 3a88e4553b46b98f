"""Bearer tokens: generated once, stored only as SHA-256, looked up in one indexed query."""

from __future__ import annotations

import hashlib
import secrets
from uuid import UUID, uuid5

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db.models import Principal
from shared.enums import Role
from shared.errors import Unauthenticated

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


async def principal_for_token(session: AsyncSession, token: str) -> Principal:
    """The principal a token belongs to, or `Unauthenticated`."""
    principal = await session.scalar(select(Principal).where(Principal.token_hash == hash_token(token)))
    if principal is None:
        raise Unauthenticated("unknown bearer token")
    return principal
