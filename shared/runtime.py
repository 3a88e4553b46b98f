"""The resources a process opens once and its services share: engine, units of work, blobs, bus, relay.

Embedded mode opens one `Runtime` for all four services; in distributed mode each process opens its
own. Services receive it and never own its lifecycle.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.blobs import BlobStore, LocalBlobStore, PostgresBlobStore, TieredBlobStore
from shared.bus import Bus, InMemoryBus, RabbitMQBus
from shared.db import UnitOfWorkFactory, create_engine, create_schema, session_factory
from shared.db.relay import OutboxRelay
from shared.settings import CommonSettings


@dataclass
class Runtime:
    """Open resources of one process."""

    settings: CommonSettings
    engine: AsyncEngine
    uow: UnitOfWorkFactory
    blobs: BlobStore
    bus: Bus
    relay: OutboxRelay

    @classmethod
    async def open(
        cls, settings: CommonSettings, *, bus: Bus | None = None, create_tables: bool = False
    ) -> Runtime:
        """Connect everything `settings` names; `create_tables` builds the schema (embedded mode)."""
        engine = create_engine(settings.database_url, **settings.engine_options())
        if create_tables:
            await create_schema(engine)
        blobs = await open_blob_store(settings, create_tables=create_tables)
        sessions = session_factory(engine)
        if bus is None:
            if settings.amqp_url:
                ns = settings.bus_namespace
                bus = RabbitMQBus(settings.amqp_url, exchange=f"{ns}.events", queue_prefix=f"{ns}.")
            else:
                bus = InMemoryBus()
        await bus.start()
        relay = OutboxRelay(sessions, bus, poll_s=settings.outbox_poll_s)
        uow = UnitOfWorkFactory(sessions, on_commit=relay.wake)
        relay.start()
        return cls(
            settings=settings,
            engine=engine,
            uow=uow,
            blobs=blobs,
            bus=bus,
            relay=relay,
        )

    async def close(self) -> None:
        """Flush the outbox, stop consuming, release connections (reverse order of opening)."""
        await self.relay.stop()
        await self.bus.close()
        await self.blobs.close()
        await self.engine.dispose()


async def open_blob_store(settings: CommonSettings, *, create_tables: bool = False) -> BlobStore:
    """The blob store `settings.blob_backend` names: the local one keeps its small blobs (up to
    `blob_row_max_bytes`) in the database and the rest as files (`TieredBlobStore`).

    The postgres store gets a connection pool of its own: a request that holds a session while it
    reads a blob must never wait for a connection from the pool it is holding one of (with 30
    concurrent downloads that deadlocked until the pool timeout).
    """
    if settings.blob_backend == "local" and settings.blob_row_max_bytes == 0:
        return LocalBlobStore(settings.blob_path, chunk_size=settings.blob_chunk_size)
    rows = PostgresBlobStore(settings.database_url, chunk_size=settings.blob_chunk_size)
    if create_tables:
        await rows.create_tables()
    if settings.blob_backend == "postgres":
        return rows
    files = LocalBlobStore(settings.blob_path, chunk_size=settings.blob_chunk_size)
    return TieredBlobStore(rows, files, max_row_bytes=settings.blob_row_max_bytes)


GC_THRESHOLDS = (20_000, 20, 10)
"""Allocations between young collections, and young collections per older one (Python: 700, 10, 10)."""


def freeze_startup_heap() -> None:
    """Keep what start-up allocated out of the garbage collector's scans.

    `gc.freeze` moves the start-up heap (torch, SQLAlchemy, pydantic: ~400k objects) to a permanent
    generation: a full collection walked all of it, 0.2-0.3 s, several times a training in embedded
    mode. Frozen objects are still freed by reference counting; only cycles among them stay (start-up
    objects live as long as the process anyway).
    """
    gc.collect()
    gc.freeze()


def collect_less_often() -> None:
    """For a process that only serves (the entry points, not a library use of the services).

    A serving process allocates many short-lived objects per request; collecting every 700
    allocations cost ~15% of the embedded server's CPU at 100 clients, every 20,000 about half
    that, for garbage cycles that wait a little longer.
    """
    gc.set_threshold(*GC_THRESHOLDS)
