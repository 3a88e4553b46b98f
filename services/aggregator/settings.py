"""The aggregator's settings: the shared ones plus where and how fast it computes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.errors import FedhubError
from shared.settings import CommonSettings


class DeviceUnavailable(FedhubError):
    """The settings ask for a torch device this machine does not have."""


class AggregatorSettings(CommonSettings):
    """`FEDHUB_*` shared settings plus `FEDHUB_AGGREGATOR_DEVICE`, `_PREFETCH`, `_TORCH_THREADS`,
    `_BATCH_SIZE`, `_SHARDS`, `_BUFFER_POOL_MIB`, `_FOLD_WINDOW` and `_SMALL_ROUND_BYTES`."""

    # The aggregator's own fields read FEDHUB_AGGREGATOR_*: in embedded mode one environment
    # configures every service, and a service-specific name says whose `prefetch` it is.
    # (`validate_by_name`, which lets tests pass `device=...`, also makes pydantic-settings accept
    # FEDHUB_DEVICE and the like; the FEDHUB_AGGREGATOR_* name wins when both are set.)
    model_config = SettingsConfigDict(env_prefix="FEDHUB_", extra="ignore", validate_by_name=True)

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        validation_alias="FEDHUB_AGGREGATOR_DEVICE",
        description="where to accumulate: auto picks cuda when torch sees a GPU, else cpu",
    )
    prefetch: int = Field(
        default=1,
        ge=1,
        validation_alias="FEDHUB_AGGREGATOR_PREFETCH",
        description="aggregation jobs one process runs at once (each holds about one model in memory)",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        validation_alias="FEDHUB_AGGREGATOR_TORCH_THREADS",
        description="torch intra-op threads; unset leaves torch's default",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        validation_alias="FEDHUB_AGGREGATOR_BATCH_SIZE",
        description=(
            "split a round with more updates than this into parts on the work queue: batches of this "
            "many updates (linear methods) or shards of tensors (coordinate-wise methods); unset: "
            "one job per round"
        ),
    )
    shards: int | None = Field(
        default=None,
        ge=1,
        validation_alias="FEDHUB_AGGREGATOR_SHARDS",
        description="shards of a split coordinate-wise round; unset: as many as batches would be",
    )
    buffer_pool_mib: int = Field(
        default=1024,
        ge=0,
        validation_alias="FEDHUB_AGGREGATOR_BUFFER_POOL_MIB",
        description="MiB of CPU buffers kept between rounds for the next round's accumulators (memory "
        "already mapped instead of fresh pages to fault in; 0 turns the pool off)",
    )
    fold_window: int = Field(
        default=4,
        ge=1,
        validation_alias="FEDHUB_AGGREGATOR_FOLD_WINDOW",
        description=(
            "decoded updates a linear method's round holds before folding them in one pass over the "
            "accumulator (CPU): memory is window + 1 models, whatever the number of clients; 1 folds "
            "each update as it comes"
        ),
    )
    small_round_bytes: int = Field(
        default=1024 * 1024,
        ge=0,
        validation_alias="FEDHUB_AGGREGATOR_SMALL_ROUND_BYTES",
        description=(
            "FedAvg and FedProx rounds over a base model of at most this many bytes (float32, float16, "
            "integer and bool tensors) are averaged with numpy on the CPU, bit for bit as torch would, "
            "without loading torch; 0 sends every round to torch"
        ),
    )
    health_host: str = Field(
        default="0.0.0.0",
        validation_alias="FEDHUB_AGGREGATOR_HEALTH_HOST",
        description="where /healthz and /readyz listen",
    )
    health_port: int = Field(
        default=8002,
        ge=0,
        validation_alias="FEDHUB_AGGREGATOR_HEALTH_PORT",
        description="probe port; 0 picks a free one (several replicas on one host)",
    )
