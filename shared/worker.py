"""Running a bus-consuming service as its own process: signals, health probes, orderly drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Protocol

import structlog

from shared.health import HealthServer, bus_check, database_check
from shared.logging import configure_logging
from shared.runtime import Runtime, collect_less_often, freeze_startup_heap
from shared.settings import CommonSettings

log = structlog.get_logger(component="worker")


class Service(Protocol):
    """What a worker process runs: started once, stopped once (stop finishes in-flight work)."""

    async def start(self) -> None:
        """Begin consuming."""

    async def stop(self) -> None:
        """Stop consuming and let in-flight work finish."""


async def run_worker(
    name: str,
    settings: CommonSettings,
    build: Callable[[Runtime], Service],
    *,
    health_host: str,
    health_port: int,
    stop: asyncio.Event | None = None,
) -> None:
    """Open the runtime, start the service and the probes, and run until SIGTERM/SIGINT (or `stop`).

    Shutdown runs in reverse order of start: probes go unready, the service drains its in-flight
    messages (each acknowledged only after its commit), then the outbox is flushed and connections close.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    async with AsyncExitStack() as stack:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            stack.callback(loop.remove_signal_handler, sig)
        runtime = await Runtime.open(settings)
        stack.push_async_callback(runtime.close)
        service = build(runtime)
        await service.start()
        stack.push_async_callback(service.stop)
        # Runs first on the way out: no new deliveries, in-flight ones finish and are acked.
        stack.push_async_callback(runtime.bus.stop_consuming)
        health = HealthServer(
            health_host, health_port, [database_check(runtime.engine), bus_check(runtime.bus)]
        )
        await health.start()
        stack.push_async_callback(health.stop)
        freeze_startup_heap()
        log.info("worker.started", service=name, health_port=health.port)
        await stop.wait()
        log.info("worker.stopping", service=name)


def worker_main(
    name: str,
    settings: CommonSettings,
    build: Callable[[Runtime], Service],
    *,
    health_host: str,
    health_port: int,
) -> None:
    """A worker process's entry point: logging as configured, then `run_worker` until a signal."""
    configure_logging(settings.log_level, settings.log_format)
    collect_less_often()
    asyncio.run(run_worker(name, settings, build, health_host=health_host, health_port=health_port))
