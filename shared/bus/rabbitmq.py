"""The RabbitMQ bus of distributed mode: a durable topic exchange, durable queues, confirms, retries.

Topology, for an exchange `fedhub.events` and a consuming queue `orchestrator`:

- `fedhub.events` (topic, durable): every published envelope, routed by its routing key;
- `orchestrator` (durable): bound to the consumer's routing keys; competing consumers share it;
- `orchestrator.retry.<ms>ms` (durable, one per backoff step): a failed delivery waits there for its
  TTL, then RabbitMQ dead-letters it back to `orchestrator` through the default exchange;
- `orchestrator.dead` (durable): deliveries that failed `max_attempts` times, reason in `x-death-reason`.

A failed delivery is copied (with confirms) to its retry or dead queue *before* the original is
acknowledged, so a crash in between duplicates it rather than losing it; the inbox drops duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
    ExchangeType,
)
from aio_pika.exceptions import AMQPError

from shared.bus.base import Bus, DeadLetter, Envelope, EnvelopeHandler, PublishNotConfirmed

log = structlog.get_logger(component="bus.rabbitmq")

ATTEMPT_HEADER = "x-attempt"
"""Which attempt a delivery is (1 for the first); absent means 1."""
REASON_HEADER = "x-death-reason"
"""Why the last attempt of a dead-lettered message failed."""
ROUTING_KEY_HEADER = "x-routing-key"
"""The original routing key: a retried message comes back through the default exchange under another."""
QUEUE_HEADER = "x-queue"
"""The consuming queue a dead letter failed in."""


class RabbitMQBus(Bus):
    """The `Bus` over RabbitMQ (aio-pika): reconnects by itself, consumers resume after a reconnect.

    Pass aio-pika connection options in the URL's query, e.g. `?reconnect_interval=1&heartbeat=30`.
    """

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "fedhub.events",
        max_attempts: int = 5,
        retry_base_s: float = 0.2,
        publish_timeout_s: float = 10,
        queue_prefix: str = "",
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.url = url
        self.exchange_name = exchange
        self.queue_prefix = queue_prefix
        """Prepended to every queue name, so that deployments sharing a broker stay apart."""
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.publish_timeout_s = publish_timeout_s
        self.connection_name = f"fedhub-{uuid4().hex[:12]}"
        """The name this bus's connection shows in the broker's management (`user_provided_name`)."""
        self.reconnects = 0
        """How many times the connection came back after a drop (consumers are restored by then)."""
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        # The robust connection holds its channels weakly: without these references a consumer's
        # channel could be collected and would not come back after a reconnect.
        self._consumer_channels: list[AbstractChannel] = []
        self._in_flight: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Connect (failing fast when the broker is unreachable) and declare the exchange."""
        connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self.connection_name}
        )
        connection.reconnect_callbacks.add(self._on_reconnect)
        self._connection = connection
        try:
            # Returns raise: a retry or dead-letter copy that no queue takes must not be acked away.
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await self._channel.declare_exchange(
                self.exchange_name, ExchangeType.TOPIC, durable=True
            )
        except BaseException:
            await connection.close()
            self._connection = None
            raise
        log.info("bus.connected", exchange=self.exchange_name, connection=self.connection_name)

    async def close(self) -> None:
        """Stop consuming, give in-flight handlers `publish_timeout_s` to finish, disconnect.

        A handler still running after that is cancelled; its message was not acknowledged, so the
        broker delivers it again.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.publish_timeout_s):
                await self.stop_consuming()
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(list(self._in_flight))
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = self._exchange = None
        self._consumer_channels.clear()

    async def stop_consuming(self) -> None:
        """Cancel every consumer, then wait for the handlers already running to finish (and ack)."""
        consumers, self._consumers = self._consumers, []
        if consumers and self._connection is not None and not self._connection.is_closed:
            # A robust queue forgets the consumer before the RPC, so even a cancel that times out
            # (broker away) keeps the reconnect from restoring it.
            results = await asyncio.gather(
                *(self._cancel(queue, tag) for queue, tag in consumers), return_exceptions=True
            )
            for (queue, _), result in zip(consumers, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("bus.cancel_failed", queue=queue.name, error=_reason(result))
        while self._in_flight:
            await asyncio.wait(list(self._in_flight))

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish in order, persistent, each confirmed by the broker; raise `PublishNotConfirmed` otherwise.

        Raises within `publish_timeout_s` when the broker is unreachable (the outbox keeps the rows
        and the relay tries again), rather than waiting for the reconnect.
        """
        exchange = self._exchange
        if exchange is None:
            raise PublishNotConfirmed("the RabbitMQ bus is not started")
        try:
            async with asyncio.timeout(self.publish_timeout_s):
                for envelope in envelopes:
                    await exchange.publish(
                        _to_message(envelope), routing_key=envelope.routing_key, mandatory=False
                    )
        except TimeoutError as exc:
            raise PublishNotConfirmed(
                f"the broker confirmed no publish within {self.publish_timeout_s} s"
            ) from exc
        except (AMQPError, ConnectionError, RuntimeError) as exc:
            # aiormq's ChannelInvalidStateError (a closed channel) is a RuntimeError.
            raise PublishNotConfirmed(f"publish failed: {_reason(exc)}") from exc

    def problem(self) -> str | None:
        """None while connected to the broker; otherwise what is wrong."""
        if self._connection is None:
            return "the RabbitMQ bus is not started"
        if self._connection.is_closed or not self._connection.connected.is_set():
            return f"RabbitMQ connection lost (reconnecting; {self.reconnects} reconnects so far)"
        return None

    async def subscribe(
        self,
        queue: str,
        routing_keys: Iterable[str],
        handler: EnvelopeHandler,
        *,
        prefetch: int = 1,
    ) -> None:
        """Declare `queue` (and its retry and dead queues), bind it, consume with `prefetch` in flight."""
        if self._connection is None:
            raise RuntimeError("the RabbitMQ bus is not started")
        keys = list(routing_keys)
        queue = self.queue_prefix + queue
        channel = await self._connection.channel()
        self._consumer_channels.append(channel)
        await channel.set_qos(prefetch_count=prefetch)
        main = await channel.declare_queue(queue, durable=True)
        await channel.declare_queue(dead_queue(queue), durable=True)
        for delay_ms in self._retry_delays_ms():
            await channel.declare_queue(
                retry_queue(queue, delay_ms),
                durable=True,
                arguments={
                    "x-message-ttl": delay_ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue,
                },
            )
        for key in keys:
            await main.bind(self.exchange_name, routing_key=key)

        async def on_message(message: AbstractIncomingMessage) -> None:
            # Own task per delivery: aiormq cancels its callback tasks when the channel drops, and a
            # handler cut mid-transaction helps nobody; its ack fails instead and the broker redelivers.
            task = asyncio.create_task(self._deliver(queue, handler, message))
            self._in_flight.add(task)
            task.add_done_callback(self._delivered)

        tag = await main.consume(on_message)
        self._consumers.append((main, tag))
        log.info("bus.subscribed", queue=queue, routing_keys=keys, prefetch=prefetch)

    async def dead_letters(self, queue: str) -> list[DeadLetter]:
        """What `queue` dead-lettered so far, oldest first; reads `<queue>.dead` without consuming it."""
        if self._connection is None:
            raise RuntimeError("the RabbitMQ bus is not started")
        letters: list[DeadLetter] = []
        queue = self.queue_prefix + queue
        channel = await self._connection.channel()
        try:
            dead = await channel.declare_queue(dead_queue(queue), durable=True)
            # Held unacked until the channel closes: basic_get never hands the same one out twice,
            # and closing the channel puts them all back.
            while (message := await dead.get(no_ack=False, fail=False)) is not None:
                headers = message.headers or {}
                letters.append(
                    DeadLetter(
                        _to_envelope(message),
                        str(headers.get(QUEUE_HEADER, queue)),
                        str(headers.get(REASON_HEADER, "")),
                    )
                )
        finally:
            await channel.close()
        return letters

    async def delete_queue(self, queue: str) -> None:
        """Delete `queue` with its retry and dead queues (tests, decommissioned consumers)."""
        if self._connection is None:
            raise RuntimeError("the RabbitMQ bus is not started")
        channel = await self._connection.channel()
        try:
            for name in self.queues_of(self.queue_prefix + queue):
                await channel.queue_delete(name)
        finally:
            await channel.close()

    async def delete_namespace(self, queues: Iterable[str]) -> None:
        """Delete these consumers' queues (with their retry and dead queues) and the exchange.

        For clusters that live only as long as a test or a benchmark run on a shared broker.
        """
        for queue in queues:
            await self.delete_queue(queue)
        if self._connection is None:
            raise RuntimeError("the RabbitMQ bus is not started")
        channel = await self._connection.channel()
        try:
            await channel.exchange_delete(self.exchange_name)
        finally:
            await channel.close()

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Unacked, so the broker redelivers once the channel goes; say why it stuck meanwhile.
            log.error("message.delivery_crashed", error=_reason(exc))

    async def _cancel(self, queue: AbstractQueue, tag: str) -> None:
        async with asyncio.timeout(self.publish_timeout_s):
            await queue.cancel(tag)

    def queues_of(self, queue: str) -> list[str]:
        """Every queue this bus declares for consuming `queue`: itself, its dead queue, its retry queues."""
        return [queue, dead_queue(queue), *(retry_queue(queue, d) for d in self._retry_delays_ms())]

    def _retry_delays_ms(self) -> list[int]:
        """The backoff before attempt n+1, for n = 1 .. max_attempts - 1: base * 2^(n-1)."""
        return [max(1, round(self.retry_base_s * 1000 * 2 ** (n - 1))) for n in range(1, self.max_attempts)]

    async def _deliver(self, queue: str, handler: EnvelopeHandler, message: AbstractIncomingMessage) -> None:
        headers = message.headers or {}
        attempt = _int_header(headers.get(ATTEMPT_HEADER), default=1)
        try:
            envelope = _to_envelope(message)
        except (ValueError, TypeError) as exc:
            # Not ours or corrupted: retrying cannot fix it.
            await self._settle_failure(queue, message, attempt=self.max_attempts, reason=_reason(exc))
            return
        try:
            await handler(envelope)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._settle_failure(queue, message, attempt=attempt, reason=_reason(exc))
            return
        try:
            await message.ack()
        except Exception as exc:
            # The channel dropped while the handler ran: the broker redelivers, the inbox dedups.
            log.warning("message.ack_lost", queue=queue, message_id=message.message_id, error=_reason(exc))

    async def _settle_failure(
        self, queue: str, message: AbstractIncomingMessage, *, attempt: int, reason: str
    ) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        headers.setdefault(ROUTING_KEY_HEADER, message.routing_key or "")
        # RabbitMQ's own dead-lettering history would grow with every retry round trip.
        headers.pop("x-death", None)
        headers.pop("x-first-death-exchange", None)
        headers.pop("x-first-death-queue", None)
        headers.pop("x-first-death-reason", None)
        if attempt >= self.max_attempts:
            target = dead_queue(queue)
            headers[REASON_HEADER] = reason
            headers[QUEUE_HEADER] = queue
            log.error("message.dead_lettered", queue=queue, type=message.type, reason=reason)
        else:
            target = retry_queue(queue, self._retry_delays_ms()[attempt - 1])
            headers[ATTEMPT_HEADER] = attempt + 1
            log.warning("message.retry", queue=queue, type=message.type, attempt=attempt, reason=reason)
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            type=message.type,
        )
        try:
            if self._channel is None:
                raise PublishNotConfirmed("the RabbitMQ bus is closed")
            async with asyncio.timeout(self.publish_timeout_s):
                await self._channel.default_exchange.publish(copy, routing_key=target, mandatory=True)
        except Exception as exc:
            log.error("message.retry_publish_failed", queue=queue, target=target, error=_reason(exc))
            # Back to the queue as it was (same attempt): better a retry too many than a lost message.
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        try:
            await message.ack()
        except Exception as exc:
            log.warning("message.ack_lost", queue=queue, message_id=message.message_id, error=_reason(exc))

    async def _on_reconnect(self, *_: object) -> None:
        self.reconnects += 1
        log.info("bus.reconnected", connection=self.connection_name, reconnects=self.reconnects)


def retry_queue(queue: str, delay_ms: int) -> str:
    """The queue where `queue`'s failed deliveries wait `delay_ms` before their next attempt."""
    return f"{queue}.retry.{delay_ms}ms"


def dead_queue(queue: str) -> str:
    """The queue of `queue`'s dead letters."""
    return f"{queue}.dead"


def _to_message(envelope: Envelope) -> aio_pika.Message:
    return aio_pika.Message(
        envelope.body,
        content_type="application/msgpack",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(envelope.message_id),
        correlation_id=str(envelope.correlation_id) if envelope.correlation_id else None,
        type=envelope.type,
        timestamp=envelope.created_at,
        headers={
            "schema_version": envelope.schema_version,
            # The AMQP timestamp keeps whole seconds only.
            "created_at": envelope.created_at.isoformat(),
        },
    )


def _to_envelope(message: AbstractIncomingMessage) -> Envelope:
    headers = message.headers or {}
    if not message.message_id or not message.type:
        raise ValueError("a delivery without message_id or type is no fedhub envelope")
    created = headers.get("created_at")
    if isinstance(created, bytes):
        created = created.decode()
    if isinstance(created, str):
        created_at = datetime.fromisoformat(created)
    elif message.timestamp is not None:
        created_at = message.timestamp.replace(tzinfo=message.timestamp.tzinfo or UTC)
    else:
        created_at = datetime.now(UTC)
    routing_key = headers.get(ROUTING_KEY_HEADER, message.routing_key or "")
    return Envelope(
        message_id=UUID(message.message_id),
        type=message.type,
        routing_key=routing_key.decode() if isinstance(routing_key, bytes) else str(routing_key),
        body=message.body,
        correlation_id=UUID(message.correlation_id) if message.correlation_id else None,
        schema_version=_int_header(headers.get("schema_version"), default=1),
        created_at=created_at,
    )


def _int_header(value: object, *, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
