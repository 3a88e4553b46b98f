"""The in-memory bus of embedded mode: same contract as RabbitMQ, inside one event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from shared.bus.base import Bus, DeadLetter, Envelope, EnvelopeHandler, topic_matches

log = structlog.get_logger(component="bus.memory")


@dataclass
class _Queue:
    bindings: set[str] = field(default_factory=set)
    messages: asyncio.Queue[tuple[Envelope, int]] = field(default_factory=asyncio.Queue)


class InMemoryBus(Bus):
    """Durable only for the life of the process; retries with backoff, then dead-letters."""

    publish_completes_inline: ClassVar[bool] = True
    """`publish` routes without ever suspending, so the outbox relay may run it inside the task that
    committed (no loop turn in between). A subclass whose `publish` waits for anything sets False."""

    def __init__(self, *, max_attempts: int = 5, retry_base_s: float = 0.05) -> None:
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.dead_letters: list[DeadLetter] = []
        self._queues: dict[str, _Queue] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Cancel the consumers (in-flight handlers are cancelled at their next await)."""
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()

    async def stop_consuming(self) -> None:
        """Stop the workers waiting for a message; let each busy one finish its handler, then stop it.

        A message left in a queue (or due back from a retry) stays there for a later `subscribe`.
        """
        self._stopping = True
        workers, self._workers = self._workers, []
        for task in workers:
            if task not in self._busy:
                # Cancelling a pending `Queue.get` leaves the message in the queue.
                task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stopping = False

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Route each envelope to every queue bound to a matching pattern."""
        for envelope in envelopes:
            for q in self._queues.values():
                if any(topic_matches(p, envelope.routing_key) for p in q.bindings):
                    q.messages.put_nowait((envelope, 1))

    async def subscribe(
        self,
        queue: str,
        routing_keys: Iterable[str],
        handler: EnvelopeHandler,
        *,
        prefetch: int = 1,
    ) -> None:
        """Bind and start `prefetch` workers on the (possibly shared) queue."""
        q = self._queues.setdefault(queue, _Queue())
        q.bindings.update(routing_keys)
        for _ in range(prefetch):
            self._workers.append(asyncio.create_task(self._consume(queue, q, handler)))

    async def _consume(self, name: str, q: _Queue, handler: EnvelopeHandler) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            envelope, attempt = await q.messages.get()
            self._busy.add(me)
            self._in_flight += 1
            self._idle.clear()
            try:
                await handler(envelope)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if attempt >= self.max_attempts:
                    log.error("message.dead_lettered", queue=name, type=envelope.type, reason=reason)
                    self.dead_letters.append(DeadLetter(envelope, name, reason))
                else:
                    log.warning(
                        "message.retry", queue=name, type=envelope.type, attempt=attempt, reason=reason
                    )
                    delay = self.retry_base_s * 2 ** (attempt - 1)
                    asyncio.get_running_loop().call_later(
                        delay, q.messages.put_nowait, (envelope, attempt + 1)
                    )
            finally:
                self._busy.discard(me)
                self._in_flight -= 1
                q.messages.task_done()
                if self._in_flight == 0:
                    self._idle.set()
