"""Settings pieces every service reuses; each service builds its own `BaseSettings` once, in `main()`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Where state, events and blobs live; read from `FEDHUB_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="FEDHUB_", extra="ignore")

    database_url: str = Field(
        default="sqlite+aiosqlite:///.fedhub/fedhub.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://...",
    )
    database_pool_size: int | None = Field(
        default=None,
        ge=1,
        description="connections each process keeps open (unset: 16 on SQLite, 10 on PostgreSQL)",
    )
    database_pool_overflow: int | None = Field(
        default=None,
        ge=0,
        description="connections opened beyond the pool under load and closed after (unset: 16 / 20)",
    )
    database_pool_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a request waits for a free connection before it fails"
    )
    amqp_url: str | None = Field(
        default=None, description="RabbitMQ URL; unset means the in-memory bus (embedded mode only)"
    )
    bus_namespace: str = Field(
        default="fedhub",
        description="RabbitMQ names: exchange `<ns>.events`, queues `<ns>.<service>`",
    )
    blob_backend: Literal["local", "postgres"] = Field(
        default="local",
        description="local: files under blob_path; postgres: chunked rows in the database_url database",
    )
    blob_path: Path = Field(default=Path(".fedhub/blobs"), description="folder of the local blob store")
    blob_row_max_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description=(
            "local backend: blobs up to this size are rows of the database's blob tables, larger "
            "ones files under blob_path (shared/blobs/tiered.py); 0 keeps every blob a file"
        ),
    )
    blob_chunk_size: int = Field(
        default=1024 * 1024, gt=0, description="bytes per chunk when blobs are streamed or stored in rows"
    )
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    outbox_poll_s: float = Field(default=0.5, gt=0, description="outbox relay poll interval")
    auth_cache_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a resolved bearer token is remembered (0: look every request up)",
    )

    def engine_options(self) -> dict[str, Any]:
        """The pool options set here, for `shared.db.create_engine` (unset ones keep its defaults)."""
        options: dict[str, Any] = {"pool_timeout": self.database_pool_timeout_s}
        if self.database_pool_size is not None:
            options["pool_size"] = self.database_pool_size
        if self.database_pool_overflow is not None:
            options["max_overflow"] = self.database_pool_overflow
        return options
