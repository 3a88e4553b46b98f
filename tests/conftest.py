"""Fixtures every test package may use: external services for the integration tests."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------
# PostgreSQL (integration). One migrated database per session; `postgres_url` empties it per test.
# ---------------------------------------------------------------------------------------------------
from collections.abc import Iterator

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests import postgres


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """The name of a database created and migrated for this session; dropped at its end."""
    from fedhub.db import upgrade

    try:
        name = postgres.run(postgres.create_database())
    except (OSError, asyncpg.PostgresError) as exc:  # TimeoutError is an OSError
        postgres.unavailable(f"{type(exc).__name__}: {exc}")
    try:
        postgres.run(upgrade(postgres.async_url(name)))
        yield name
    finally:
        postgres.run(postgres.drop_database(name))


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """The asyncpg URL of the session's migrated database, every table emptied for this test."""
    postgres.run(postgres.truncate_all(postgres_database))
    return postgres.async_url(postgres_database)


@pytest.fixture
def fresh_postgres_url(postgres_database: str) -> Iterator[str]:
    """The asyncpg URL of a new, empty (unmigrated) database, dropped after the test."""
    name = postgres.run(postgres.create_database())
    yield postgres.async_url(name)
    postgres.run(postgres.drop_database(name))


# ---------------------------------------------------------------------------------------------------
# end of the PostgreSQL section
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# RabbitMQ (integration). `rabbitmq_url`: a broker that accepts connections, or fail/skip.
# ---------------------------------------------------------------------------------------------------
RABBITMQ_URL_ENV = "FEDHUB_TEST_AMQP_URL"
"""Where the RabbitMQ of the integration tests listens; a local broker by default."""


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """The URL of a reachable RabbitMQ; fails the test under CI=true when there is none, skips elsewhere."""
    # Imported here so this section stays self-contained beside the others.
    import os
    import socket
    from urllib.parse import urlsplit

    url = os.environ.get(RABBITMQ_URL_ENV, "amqp://guest:guest@127.0.0.1:5672/")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        reason = f"nothing answers at {host}:{port} ({exc}); start RabbitMQ or set {RABBITMQ_URL_ENV}"
        if os.environ.get("CI", "").lower() in {"true", "1"}:
            pytest.fail(f"RabbitMQ is required under CI=true: {reason}")
        pytest.skip(f"RabbitMQ unavailable: {reason}")
    return url


# ---------------------------------------------------------------------------------------------------
# end of the RabbitMQ section
# ---------------------------------------------------------------------------------------------------
