"""The message bus port, its envelope, the in-memory and the RabbitMQ implementations."""

from shared.bus.base import (
    Bus,
    DeadLetter,
    Envelope,
    EnvelopeHandler,
    PublishNotConfirmed,
    envelope_for,
    topic_matches,
)
from shared.bus.memory import InMemoryBus
from shared.bus.rabbitmq import RabbitMQBus

__all__ = [
    "Bus",
    "DeadLetter",
    "Envelope",
    "EnvelopeHandler",
    "InMemoryBus",
    "PublishNotConfirmed",
    "RabbitMQBus",
    "envelope_for",
    "topic_matches",
]
