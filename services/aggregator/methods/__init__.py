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
from services.aggregator.methods.coordinate import Median, TrimmedMean
from services.aggregator.methods.dp import DPFedAvg
from services.aggregator.methods.ensemble import Ensemble
from services.aggregator.methods.fedavg import FedAvg, FedProx
from services.aggregator.methods.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from services.aggregator.methods.krum import Bulyan, Krum, MultiKrum
from services.aggregator.methods.linear import LinearMethod, Partial
from services.aggregator.methods.swag import Swag
from shared.aggregation import AggregationMethod

_CLASSES: tuple[type[Method], ...] = (
    FedAvg,
    FedProx,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    DPFedAvg,
    Swag,
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
    Bulyan,
    Ensemble,
)

METHODS: Mapping[AggregationMethod, type[Method]] = MappingProxyType({cls.name: cls for cls in _CLASSES})
"""Method classes by the `AggregationMethod` a training names; a new method adds its class to `_CLASSES`."""

__all__ = [
    "METHODS",
    "Aggregate",
    "Bulyan",
    "DPFedAvg",
    "Ensemble",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "InvalidWeight",
    "Krum",
    "LinearMethod",
    "Median",
    "Method",
    "MultiKrum",
    "NothingToAggregate",
    "Partial",
    "RoundContext",
    "ServerOptimizer",
    "Swag",
    "TooFewUpdates",
    "TrimmedMean",
    "UpdateMismatch",
]
