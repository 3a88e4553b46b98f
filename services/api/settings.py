"""Settings of the HTTP API, read from `FEDHUB_*` environment variables."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class ApiSettings(CommonSettings):
    """The API's settings: the bootstrap admin token, the upload limit and where to listen."""

    admin_token: str = Field(min_length=1, description="token of the bootstrap actor (FEDHUB_ADMIN_TOKEN)")
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="largest accepted request body")
    host: str = Field(default="127.0.0.1", description="interface the standalone server binds")
    port: int = Field(default=8000, ge=0, le=65535, description="port the standalone server listens on")
    idle_connection_s: int = Field(
        default=75,
        ge=1,
        description=(
            "how long an idle client connection stays open; longer than a round, so that clients "
            "waiting for the next one do not find their connection closed (uvicorn's default is 5 s)"
        ),
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        description=(
            "requests worked on at once; more wait their turn (event streams never wait). With "
            "gate_at_socket, the clients' round requests: reports and model downloads"
        ),
    )
    max_concurrent_other_requests: int = Field(
        default=16,
        ge=1,
        description=(
            "with gate_at_socket: other requests worked on at once (each runs its own queries: "
            "more than the database pool holds would only wait inside it)"
        ),
    )
    gate_at_socket: bool = Field(
        default=True,
        description=(
            "keep the requests beyond max_concurrent_requests unread in their sockets, and no request "
            "state on idle connections (services/api/connections.py); false: uvicorn reads every "
            "request and the app's gate holds the rest"
        ),
    )
    create_tables: bool = Field(
        default=False, description="create missing tables at start (SQLite, development); else migrate"
    )
