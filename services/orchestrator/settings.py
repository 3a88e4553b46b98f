"""Orchestrator settings (FEDHUB_* environment)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class OrchestratorSettings(CommonSettings):
    """How often deadlines are checked and how many events are handled at once."""

    deadline_tick_s: float = Field(default=1.0, gt=0, description="how often overdue rounds are checked")
    prefetch: int = Field(
        default=8,
        ge=1,
        description=(
            "events handled concurrently; transitions of one training still take turns (row lock "
            "and version check), so this overlaps the database round trips of many updates"
        ),
    )
    health_host: str = Field(default="0.0.0.0", description="where /healthz and /readyz listen")
    health_port: int = Field(default=8001, ge=0, description="probe port; 0 picks a free one")
