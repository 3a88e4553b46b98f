"""The bus port: publish envelopes to a topic exchange, consume them from named durable queues.

Delivery is at-least-once: a handler that raises gets the message again (with backoff), up to
`max_attempts`, after which the message is dead-lettered with the reason. Consumers make effects
idempotent with the inbox (see `shared.messaging`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID, uuid4

from shared.codec import encode_message
from shared.events import Message, utcnow


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A message on the wire: identity and type in the envelope (AMQP properties), payload in `body`."""

    message_id: UUID
    type: str
    routing_key: str
    body: bytes
    correlation_id: UUID | None = None
    schema_version: int = 1
    created_at: datetime = field(default_factory=utcnow)


def envelope_for(
    message: Message, *, message_id: UUID | None = None, correlation_id: UUID | None = None
) -> Envelope:
    """Wrap a message for the bus."""
    return Envelope(
        message_id=message_id or uuid4(),
        type=type(message).__name__,
        routing_key=message.routing_key,
        body=encode_message(message),
        correlation_id=correlation_id,
    )


class PublishNotConfirmed(Exception):
    """The broker did not confirm a publish (unreachable, timed out, or refused); publish again later."""


EnvelopeHandler = Callable[[Envelope], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that exhausted its attempts, with the reason its last attempt failed."""

    envelope: Envelope
    queue: str
    reason: str


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` is zero or more words."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


class Bus(ABC):
    """A topic exchange with durable queues; competing consumers share a queue."""

    @abstractmethod
    async def start(self) -> None:
        """Connect and declare what the bus needs."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming, let in-flight handlers finish, disconnect."""

    @abstractmethod
    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publish and return once the broker has taken every envelope (confirmed)."""

    @abstractmethod
    async def subscribe(
        self,
        queue: str,
        routing_keys: Iterable[str],
        handler: EnvelopeHandler,
        *,
        prefetch: int = 1,
    ) -> None:
        """Bind `queue` to `routing_keys` and start consuming with up to `prefetch` messages in flight."""

    def problem(self) -> str | None:
        """Why the bus cannot carry messages right now, or None when it can (readiness probes)."""
        return None

    async def stop_consuming(self) -> None:  # noqa: B027 - optional: a bus may only drain in close
        """Take no new deliveries and return once the handlers already running have finished.

        For a graceful shutdown (SIGTERM): drain, then `close`. Publishing keeps working.
        """
