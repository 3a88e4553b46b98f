"""The aggregator service: wires its handlers to the bus; `main()` runs it as its own process."""

from __future__ import annotations

import asyncio

import structlog

from services.aggregator.handlers import build_handlers
from services.aggregator.settings import AggregatorSettings
from shared.bus import Envelope
from shared.messaging import Consumer
from shared.runtime import Runtime
from shared.worker import worker_main

log = structlog.get_logger(component="aggregator")

QUEUE = "aggregator"
"""The aggregator's work queue: competing aggregator processes share it."""


class Aggregator:
    """Consumes aggregation jobs from the runtime's bus, `prefetch` at a time."""

    def __init__(self, settings: AggregatorSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self._consumer = Consumer(QUEUE, build_handlers(settings, runtime.blobs), runtime.uow)
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._held = asyncio.Event()

    async def start(self) -> None:
        """Start consuming (torch and its settings load with the first round that needs them)."""
        await self.runtime.bus.subscribe(
            self._consumer.name, self._consumer.routing_keys, self._deliver, prefetch=self.settings.prefetch
        )
        log.info("aggregator.started", prefetch=self.settings.prefetch, device=self.settings.device)

    async def stop(self) -> None:
        """Take no new job and wait for the running ones to commit; the runtime closes the bus after."""
        self._stopping = True
        await self._idle.wait()
        log.info("aggregator.stopped")

    async def _deliver(self, envelope: Envelope) -> None:
        if self._stopping:
            # The bus port has no unsubscribe: hold the delivery unacknowledged until the bus closes,
            # which hands it back to the broker for another aggregator instead of running it here.
            await self._held.wait()
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._consumer.handle(envelope)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


def main() -> None:
    """Entry point of a standalone aggregator process (distributed mode), configured by `FEDHUB_*`."""
    settings = AggregatorSettings()
    worker_main(
        "aggregator",
        settings,
        lambda runtime: Aggregator(settings, runtime),
        health_host=settings.health_host,
        health_port=settings.health_port,
    )


if __name__ == "__main__":
    main()
