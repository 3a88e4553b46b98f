"""The contract every aggregation method follows, and the errors a method raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from shared.errors import FedhubError, TensorSpecMismatch


class NothingToAggregate(FedhubError):
    """`result()` was asked for while no update with a positive weight had been added."""

    status_code = 422


class InvalidWeight(FedhubError):
    """An update's weight is negative, NaN or infinite."""

    status_code = 422


class UpdateMismatch(TensorSpecMismatch):
    """An update names a tensor the base model lacks, or one of another dtype or shape."""


class StreamingMethod(ABC):
    """An aggregation method that folds updates in one at a time, holding about one model in memory.

    Lifecycle: build it over the base (previous global) model, `add` each update with its weight,
    then take `result()` once.
    """

    @abstractmethod
    def __init__(self, base: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """Start from `base` (the previous global model); accumulate on `device`."""

    @abstractmethod
    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's update in; the caller may release `update` afterwards."""

    @abstractmethod
    def result(self) -> dict[str, torch.Tensor]:
        """The aggregated state dict on the CPU, in the base model's tensor order."""
