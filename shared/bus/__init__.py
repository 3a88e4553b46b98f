"""The message bus port, its envelope, and the in-memory implementation."""

from shared.bus.base import Bus, DeadLetter, Envelope, EnvelopeHandler, envelope_for, topic_matches
from shared.bus.memory import InMemoryBus

__all__ = ["Bus", "DeadLetter", "Envelope", "EnvelopeHandler", "InMemoryBus", "envelope_for", "topic_matches"]
