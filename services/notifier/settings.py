"""Settings of the notifier: stream keepalives, subscriber buffers and webhook delivery policy."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class NotifierSettings(CommonSettings):
    """The notifier's knobs on top of the common ones, read from `FEDHUB_*` environment variables."""

    host: str = Field(default="127.0.0.1", description="address the standalone notifier listens on")
    port: int = Field(default=8003, ge=0, le=65535, description="port the standalone notifier listens on")
    keepalive_s: float = Field(default=15.0, gt=0, description="seconds between `: keepalive` comments")
    subscriber_queue_size: int = Field(
        default=1000, ge=1, description="live notifications buffered per stream before it is disconnected"
    )
    socket_streams: bool = Field(
        default=True,
        description="serve an event stream that opens its connection straight off the socket, below "
        "the app (~3 KiB per idle stream instead of ~20; services/notifier/direct.py); false: every "
        "stream through the app",
    )
    stream_admissions: int = Field(
        default=16,
        ge=1,
        description="event stream callers checked at once (each check may read the database); the "
        "others wait with only their request",
    )
    inline_model_max_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description="a round notification carries its global model when the model's bytes are at most "
        "this many (clients then train without a download); 0: never",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="timeout of one webhook POST")
    webhook_max_attempts: int = Field(
        default=8, ge=1, description="attempts before a webhook delivery is left dead"
    )
    webhook_backoff_base_s: float = Field(
        default=1.0, gt=0, description="wait before the first retry; doubles with every failed attempt"
    )
    webhook_backoff_max_s: float = Field(default=300.0, gt=0, description="cap of the retry wait")
    webhook_poll_s: float = Field(
        default=5.0, gt=0, description="how often the webhook worker looks for due deliveries unwoken"
    )
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0, description="standalone server: how long open requests may delay a shutdown"
    )
