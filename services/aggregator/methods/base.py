"""The contract every aggregation method follows, and the errors a method raises.

A method is built once per round (or per shard of a round, see `Method.shardable`) over a
`RoundContext`, is fed the round's accepted updates with `add`, and gives one `Aggregate`.
Updates reaching a method are already validated and converted by the pipeline: full weights (a
delta upload was added to the base), exactly the base's tensor names, dtypes and shapes, finite.
Methods are pure torch: no I/O, no clock, randomness only from `RoundContext.seed`.

Families (what the pipeline may do with them):
- `LinearMethod`: the result depends on the updates only through a weighted mean of (per-update
  transformed) tensors. Memory: about one model. Mergeable: partial means of disjoint batches of
  updates combine exactly (`partial` / `merge`), so batches can run on different pods.
- coordinate-wise methods (median, trimmed mean): every output coordinate depends only on the same
  coordinate of the updates, so a method built over a subset of the base's tensors gives exactly
  those tensors of the full result (`shardable = True`). They hold every update of their shard.
- global methods (Krum, Multi-Krum, Bulyan, ensemble): need whole updates; one job per round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from services.aggregator.methods.buffers import BufferLease
from services.aggregator.rounds import InvalidWeight as InvalidWeight
from shared.aggregation import AggregationMethod, MethodParams
from shared.errors import FedhubError, TensorSpecMismatch


class NothingToAggregate(FedhubError):
    """`result()` was asked for while no update with a positive weight had been added."""

    status_code = 422


class UpdateMismatch(TensorSpecMismatch):
    """An update names a tensor the base model lacks, or one of another dtype or shape."""


class TooFewUpdates(FedhubError):
    """A method's parameters need more updates than the round has (e.g. Krum needs n > 2f + 2)."""

    status_code = 422


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What a method may know besides the updates."""

    base: Mapping[str, torch.Tensor]
    """The previous global model (CPU tensors), restricted to the tensors being aggregated."""
    device: torch.device
    """Where to compute; results come back on the CPU."""
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    """Server state the previous round's `Aggregate.state` left (empty in round 1), e.g. Adam moments."""
    seed: int = 0
    """Deterministic per (training, round): the only source of randomness (DP noise)."""
    buffers: BufferLease = field(default_factory=BufferLease)
    """Where a method takes large CPU buffers it writes before reading (accumulators): recycled
    from earlier rounds when the aggregator keeps a `BufferPool`, else fresh."""


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A round's outcome."""

    model: dict[str, torch.Tensor]
    """The new global model, CPU tensors, the base's names in the base's order."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """Server state to hand to the next round's `RoundContext.state` (empty: none)."""
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    """Ensemble members (CPU), in the order their updates were added; empty for other methods."""
    record: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts about the round worth keeping (DP clip and noise, Krum's selection as
    indices into the order of `add`, how many values were trimmed per coordinate)."""


class Method(ABC):
    """An aggregation method: built per round, fed updates with `add`, read once with `result`."""

    name: ClassVar[AggregationMethod]
    """The `AggregationMethod` this class implements."""
    params_type: ClassVar[type[MethodParams]]
    """Its parameter model (from `shared.aggregation.PARAMS`)."""
    holds_updates: ClassVar[bool]
    """True when the method keeps every update until `result` (memory: updates x model)."""
    shardable: ClassVar[bool] = False
    """True when the method over a subset of tensors gives exactly those tensors of the full result."""

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        if not isinstance(params, self.params_type):
            wanted, got = self.params_type.__name__, type(params).__name__
            raise TypeError(f"{type(self).__name__} takes {wanted}, got {got}")
        self.ctx = ctx
        self.params = params

    @abstractmethod
    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Take one client's update with its weight (number of examples); may raise `InvalidWeight`."""

    @abstractmethod
    def result(self) -> Aggregate:
        """The round's outcome; callable once. Raises `NothingToAggregate` or `TooFewUpdates`."""
