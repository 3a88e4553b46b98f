"""The fedhub client SDK: `Client` trains and tests for a training; `ActorClient` runs trainings."""

from fedhub.client.actor import ActorClient
from fedhub.client.client import Client
from fedhub.client.errors import ClientError, ServerUnreachable
from fedhub.client.retry import RetryPolicy
from fedhub.client.sse import ServerSentEvent, SSEParser
from fedhub.client.types import (
    EvaluateFn,
    EventHook,
    FitFn,
    ModelInfo,
    Notification,
    Principal,
    RunResult,
)

__all__ = [
    "ActorClient",
    "Client",
    "ClientError",
    "EvaluateFn",
    "EventHook",
    "FitFn",
    "ModelInfo",
    "Notification",
    "Principal",
    "RetryPolicy",
    "RunResult",
    "SSEParser",
    "ServerSentEvent",
    "ServerUnreachable",
]
