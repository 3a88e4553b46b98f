"""fedhub: what users touch. The client SDK (`fedhub.Client`), the CLI and the embedded runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedhub.client import ActorClient, Client

__all__ = ["ActorClient", "Client"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `fedhub api` and friends do not pay for importing torch through the SDK.
    if name in __all__:
        from fedhub import client

        return getattr(client, name)
    raise AttributeError(f"module 'fedhub' has no attribute {name!r}")
