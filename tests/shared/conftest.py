"""Fixtures of the shared tests: an embedded runtime, and RabbitMQ buses that clean up after themselves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

import aio_pika
import pytest

from shared.bus import EnvelopeHandler, RabbitMQBus
from shared.runtime import Runtime
from shared.settings import CommonSettings


@pytest.fixture
async def runtime(tmp_path):
    """An open embedded runtime (schema created, in-memory bus), closed after the test."""
    settings = CommonSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        # A poll far longer than any wait here: a prompt publish proves the commit woke the relay.
        outbox_poll_s=60,
    )
    rt = await Runtime.open(settings, create_tables=True)
    yield rt
    await rt.close()


class _TrackedBus(RabbitMQBus):
    """A RabbitMQ bus that remembers the queues it consumed, so the test can delete them."""

    def __init__(self, url: str, queues: set[str], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._tracked = queues

    async def subscribe(
        self, queue: str, routing_keys: Iterable[str], handler: EnvelopeHandler, **kw
    ) -> None:
        """Record every queue this bus declares for `queue`, then subscribe."""
        self._tracked.update(self.queues_of(queue))
        await super().subscribe(queue, routing_keys, handler, **kw)


class RabbitMQBuses:
    """Starts RabbitMQ buses on an exchange of one test's own; `cleanup` closes them and deletes it all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.exchange = f"test-{uuid4().hex}"
        self.buses: list[RabbitMQBus] = []
        self._queues: set[str] = set()

    async def make(self, **kwargs: Any) -> RabbitMQBus:
        """A started bus on this test's exchange; fast retries and reconnects by default."""
        kwargs.setdefault("retry_base_s", 0.01)
        reconnect_interval = kwargs.pop("reconnect_interval", 0.1)
        separator = "&" if "?" in self.url else "?"
        url = f"{self.url}{separator}reconnect_interval={reconnect_interval}"
        bus = _TrackedBus(url, self._queues, exchange=self.exchange, **kwargs)
        await bus.start()
        self.buses.append(bus)
        return bus

    async def cleanup(self) -> None:
        """Close every bus, then delete this test's queues and exchange over a connection of its own."""
        for bus in self.buses:
            await bus.close()
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            for name in sorted(self._queues):
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(name)
            await channel.exchange_delete(self.exchange)


@pytest.fixture
async def rabbitmq_buses(rabbitmq_url):
    """A `RabbitMQBuses` for this test, cleaned up after it."""
    buses = RabbitMQBuses(rabbitmq_url)
    yield buses
    await buses.cleanup()
