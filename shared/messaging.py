"""Consumers: decode an envelope, apply its handler in one unit of work with the inbox, then ack.

Queue bindings are derived from a service's handler registry, never listed twice.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from shared.bus.base import Bus, Envelope
from shared.codec import decode_message
from shared.db.uow import UnitOfWork, UnitOfWorkFactory
from shared.errors import MalformedPayload
from shared.events import MESSAGE_TYPES, Message
from shared.metrics import REGISTRY, seconds_since

Handler = Callable[[Any, UnitOfWork], Awaitable[None]]
"""`async def on_x(message: X, uow: UnitOfWork) -> None`: writes state and outbox rows, never commits."""

log = structlog.get_logger(component="consumer")

DELIVERY_SECONDS = REGISTRY.histogram(
    "fedhub_message_delivery_seconds",
    "From a message's outbox row (written in its producer's transaction) to its handler starting",
    ("consumer", "type"),
)
HANDLE_SECONDS = REGISTRY.histogram(
    "fedhub_message_handle_seconds",
    "A message's handler and the commit of its unit of work",
    ("consumer", "type"),
)

_handling: contextvars.ContextVar[Envelope | None] = contextvars.ContextVar("fedhub_handling", default=None)


def handling() -> Envelope | None:
    """The envelope whose handler is running in this task (None outside a consumer's handler).

    Handlers that time what a message set off (the orchestrator's triggers) read its `created_at`.
    """
    return _handling.get()


class Consumer:
    """One service's consumer: a named durable queue bound to the routing keys of its handlers."""

    def __init__(self, name: str, handlers: Mapping[type[Message], Handler], uow: UnitOfWorkFactory) -> None:
        self.name = name
        self._handlers = dict(handlers)
        self._uow = uow

    @property
    def routing_keys(self) -> list[str]:
        """The routing keys this consumer's queue binds to."""
        return sorted({cls.routing_key for cls in self._handlers})

    async def subscribe(self, bus: Bus, *, prefetch: int = 1) -> None:
        """Start consuming this service's queue."""
        await bus.subscribe(self.name, self.routing_keys, self.handle, prefetch=prefetch)

    async def handle(self, envelope: Envelope) -> None:
        """Apply one delivery exactly once: a redelivered message id is acknowledged without effect.

        The inbox is claimed after the handler ran, in the same transaction: a duplicate rolls the
        handler's writes back. Claiming last keeps the transaction's write phase short, so a handler
        may compute at length before it touches the database without holding a write lock (SQLite).
        """
        cls = MESSAGE_TYPES.get(envelope.type)
        if cls is None or cls not in self._handlers:
            raise MalformedPayload(f"{self.name} has no handler for message type {envelope.type!r}")
        message = decode_message(cls, envelope.body)
        DELIVERY_SECONDS.observe(seconds_since(envelope.created_at), consumer=self.name, type=envelope.type)
        started = time.perf_counter()
        token = _handling.set(envelope)
        with structlog.contextvars.bound_contextvars(
            consumer=self.name, message_id=str(envelope.message_id), message_type=envelope.type
        ):
            try:
                async with self._uow() as uow:
                    await self._handlers[cls](message, uow)
                    # A message that changed nothing needs no inbox row (see `changed_nothing`).
                    if not uow.unchanged and not await uow.claim_inbox(self.name, envelope.message_id):
                        raise _Duplicate
            except _Duplicate:
                log.info("message.duplicate_dropped")
            finally:
                _handling.reset(token)
                HANDLE_SECONDS.observe(time.perf_counter() - started, consumer=self.name, type=envelope.type)


class _Duplicate(Exception):
    """Raised inside the unit of work to roll back the effects of an already-applied message."""
