"""Aggregation methods: pure torch kernels, registered by their `AggregationMethod`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from services.aggregator.methods.base import (
    Aggregate,
    InvalidWeight,
    Method,
    NothingToAggregate,
    RoundContext,
    TooFewUpdates,
    UpdateMismatch,
)
from services.aggregator.methods.fedavg import FedAvg, FedProx
from services.aggregator.methods.linear import LinearMethod, Partial
from shared.aggregation import AggregationMethod

_CLASSES: tuple[type[Method], ...] = (
    FedAvg,
    FedProx,
)

METHODS: Mapping[AggregationMethod, type[Method]] = MappingProxyType({cls.name: cls for cls in _CLASSES})
"""Method classes by the `AggregationMethod` a training names; a new method adds its class to `_CLASSES`."""

__all__ = [
    "METHODS",
    "Aggregate",
    "FedAvg",
    "FedProx",
    "InvalidWeight",
    "LinearMethod",
    "Method",
    "NothingToAggregate",
    "Partial",
    "RoundContext",
    "TooFewUpdates",
    "UpdateMismatch",
]
