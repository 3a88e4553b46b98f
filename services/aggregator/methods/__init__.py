"""Aggregation methods: pure torch kernels, registered by their `AggregationMethod` value."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from services.aggregator.methods.base import (
    InvalidWeight,
    NothingToAggregate,
    StreamingMethod,
    UpdateMismatch,
)
from services.aggregator.methods.fedavg import FedAvg
from shared.enums import AggregationMethod

METHODS: Mapping[str, type[StreamingMethod]] = MappingProxyType(
    {
        AggregationMethod.FEDAVG.value: FedAvg,
    }
)
"""Method classes by the name a training's `aggregation` holds; a new method plugs in here."""

__all__ = ["METHODS", "FedAvg", "InvalidWeight", "NothingToAggregate", "StreamingMethod", "UpdateMismatch"]
