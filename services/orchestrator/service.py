"""The orchestrator service: consumes training events and times out overdue phases."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from services.orchestrator.handlers import HANDLERS, check_deadline
from services.orchestrator.repository import TrainingRepository
from services.orchestrator.settings import OrchestratorSettings
from shared.events import utcnow
from shared.messaging import Consumer
from shared.runtime import Runtime
from shared.worker import worker_main

log = structlog.get_logger(component="orchestrator")


class Orchestrator:
    """Wires the handlers to the bus and runs the deadline ticker."""

    def __init__(self, settings: OrchestratorSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.consumer = Consumer("orchestrator", HANDLERS, runtime.uow)
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start consuming and ticking."""
        await self.consumer.subscribe(self.runtime.bus, prefetch=self.settings.prefetch)
        self._ticker = asyncio.create_task(self._tick_forever(), name="orchestrator-deadlines")

    async def stop(self) -> None:
        """Stop the ticker (consumers stop with the bus)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def tick(self) -> int:
        """Time out every overdue phase once; return how many trainings moved."""
        async with self.runtime.uow() as uow:
            overdue = await TrainingRepository(uow.session).overdue(utcnow())
        moved = 0
        for training_id in overdue:
            try:
                async with self.runtime.uow() as uow:
                    moved += await check_deadline(training_id, uow)
            except Exception as exc:  # one bad training must not stop the others' deadlines
                log.warning("deadline.check_failed", training_id=str(training_id), error=repr(exc))
        return moved

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.deadline_tick_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("deadline.tick_failed", error=repr(exc))


def main() -> None:
    """Entry point of a standalone orchestrator process (distributed mode), configured by `FEDHUB_*`."""
    settings = OrchestratorSettings()
    worker_main(
        "orchestrator",
        settings,
        lambda runtime: Orchestrator(settings, runtime),
        health_host=settings.health_host,
        health_port=settings.health_port,
    )


if __name__ == "__main__":
    main()
