"""The linear family: methods whose result depends on the updates only through a weighted mean.

A `LinearMethod` streams the weighted running mean of `transform(update)` per tensor, holding about
one model whatever the number of clients, then hands the mean to `finish`, which subclasses
override (FedAvg returns it, the server optimisers step from it, DP-FedAvg adds noise to it).
Batches of a round's updates may run on different pods: each gives a `Partial`, and `merge` folds
a partial into another instance exactly as if that batch's updates had been added to it.

Accumulation by dtype
---------------------
- float32, float16, bfloat16: the running weighted mean in float32; float64: in float64.
  ``m_k = m_{k-1} + (n_k / N_k) (x_k - m_{k-1})`` with ``N_k = n_1 + ... + n_k`` (one in-place
  ``lerp_`` per tensor): the running sum divided by the weight so far, so one client's tensor or
  identical tensors come out bit for bit and ``n_k x_k`` never overflows a float32.
- integer and bool tensors: the float64 running sum ``sum_k n_k x_k`` (exact below 2**53). The
  mean is rounded to the nearest integer with ties to even (``torch.round``) in the tensor's dtype;
  a bool is True where the weighted share of True is at least 0.5.

An update may leave tensors out: a tensor's mean runs over the updates that carry it (its weight
renormalised per tensor); a tensor no update with a positive weight carried keeps
`unsent_value` (the base's value). A zero-weight update is counted but never accumulated, so its
values (even NaN) have no influence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from services.aggregator.methods.base import (
    Aggregate,
    InvalidWeight,
    Method,
    NothingToAggregate,
    RoundContext,
    UpdateMismatch,
)
from shared.aggregation import AggregationMethod, MethodParams
from shared.errors import MalformedPayload

_ACCUMULATE_AS: Mapping[torch.dtype, torch.dtype] = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}

_CPU = torch.device("cpu")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of `dtype` accumulates in (float64 for integers and bool, see the module doc)."""
    return _ACCUMULATE_AS.get(dtype, torch.float64)


@dataclass(frozen=True, slots=True, kw_only=True)
class Partial:
    """What a batch of updates contributes to a linear method, to be merged elsewhere.

    `accumulators` holds, per tensor, the running weighted mean (floating tensors, in their
    accumulation dtype) or the float64 running weighted sum (integer and bool tensors); `weights`
    the total weight behind each. `counts` holds a method's own counters (DP: updates clipped).
    """

    method: AggregationMethod
    accumulators: dict[str, torch.Tensor]
    weights: dict[str, float]
    num_added: int
    total_weight: float
    counts: dict[str, int] = field(default_factory=dict)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """This partial as plain CPU tensors (for a tensor blob); `from_tensors` reads it back exactly."""
        out: dict[str, torch.Tensor] = {
            "method": torch.tensor(list(self.method.value.encode()), dtype=torch.uint8),
            "num_added": torch.tensor(self.num_added, dtype=torch.int64),
            "total_weight": torch.tensor(self.total_weight, dtype=torch.float64),
        }
        for key, count in self.counts.items():
            out[f"count/{key}"] = torch.tensor(count, dtype=torch.int64)
        for name, acc in self.accumulators.items():
            out[f"acc/{name}"] = acc.to(_CPU)
            out[f"weight/{name}"] = torch.tensor(self.weights[name], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Partial:
        """Read back what `to_tensors` wrote; `MalformedPayload` names what is missing or unknown."""
        try:
            method = AggregationMethod(bytes(tensors["method"].tolist()).decode())
            num_added = int(tensors["num_added"].item())
            total_weight = float(tensors["total_weight"].item())
        except (KeyError, ValueError, RuntimeError) as exc:
            raise MalformedPayload(f"not a linear method's partial: {exc!r}") from None
        accumulators: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        counts: dict[str, int] = {}
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "acc":
                accumulators[name] = tensor
                weight = tensors.get(f"weight/{name}")
                if weight is None or weight.numel() != 1:
                    raise MalformedPayload(f"partial: accumulator {name!r} has no weight")
                weights[name] = float(weight.item())
            elif kind == "count" and tensor.numel() == 1:
                counts[name] = int(tensor.item())
            elif kind != "weight" and key not in ("method", "num_added", "total_weight"):
                raise MalformedPayload(f"partial: unknown entry {key!r}")
        return cls(
            method=method,
            accumulators=accumulators,
            weights=weights,
            num_added=num_added,
            total_weight=total_weight,
            counts=counts,
        )


class LinearMethod(Method):
    """A weighted running mean of `transform(update)` per tensor, turned into the round by `finish`."""

    holds_updates: ClassVar[bool] = False

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self._base = {name: t.detach() for name, t in ctx.base.items()}
        self._device = ctx.device
        self._acc: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._total_weight = 0.0
        self._added = 0
        self._finished = False

    @property
    def base(self) -> Mapping[str, torch.Tensor]:
        """The round's base model (CPU tensors, never written to)."""
        return self._base

    @property
    def num_added(self) -> int:
        """How many updates were added (zero-weight ones and merged ones included)."""
        return self._added

    @property
    def counts(self) -> Mapping[str, int]:
        """The method's own counters (see `count`), merged ones included."""
        return self._counts

    @property
    def total_weight(self) -> float:
        """Sum of the (effective, see `weigh`) weights added so far."""
        return self._total_weight

    # Hooks ------------------------------------------------------------------------------------

    def weigh(self, weight: float) -> float:
        """The weight an update's mean uses, from the weight it was added with (default: itself)."""
        return weight

    def transform(self, update: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """What of `update` enters the mean (default: the update itself), with the update's dtypes.

        Called once per update with a positive effective weight, after the update was checked
        against the base. A returned tensor may be on any device; it is never written to.
        """
        return update

    def unsent_value(self, name: str) -> torch.Tensor:
        """The mean of a tensor no update carried: a copy of the base's (accumulation dtype, device)."""
        base = self._base[name]
        if base.dtype.is_floating_point:
            return base.to(self._device, accumulation_dtype(base.dtype), copy=True)
        return base.to(self._device, copy=True)

    def finish(self, mean: dict[str, torch.Tensor]) -> Aggregate:
        """The round's outcome from the mean (default: the mean itself, FedAvg).

        `mean` holds every base tensor, in the base's order, on the compute device: floating
        tensors as their weighted mean in the accumulation dtype (float32, or float64), integer and
        bool tensors already rounded or thresholded in their own dtype. It may be consumed.
        """
        return Aggregate(model=self.to_model(mean))

    def count(self, key: str, by: int = 1) -> None:
        """Add `by` to one of the method's counters (kept in partials and merged)."""
        self._counts[key] = self._counts.get(key, 0) + by

    # Helpers for subclasses -------------------------------------------------------------------

    def base_on_device(self, name: str) -> torch.Tensor:
        """The base's tensor `name` on the compute device in its accumulation dtype (itself if already so)."""
        base = self._base[name]
        return base.to(self._device, accumulation_dtype(base.dtype))

    def to_model(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pop every base tensor out of `mean` cast to the base's dtype, on the CPU, in the base's order."""
        return {name: mean.pop(name).to(base.dtype).to(_CPU) for name, base in self._base.items()}

    # The contract -----------------------------------------------------------------------------

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold `update` in with weight `weight` (its number of examples), tensor by tensor.

        Raises
        ------
        InvalidWeight
            `weight` is negative, NaN or infinite.
        UpdateMismatch
            A tensor is unknown to the base model or differs from it in dtype or shape.
        """
        self._check_open("add")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidWeight(f"update weight must be a finite number >= 0, got {weight}")
        # Check everything first so that a refused update leaves no partial trace.
        for name, tensor in update.items():
            self._check(name, tensor.dtype, tensor.shape, what="tensor")
        effective = self.weigh(weight)
        if effective == 0:
            # Skipping also keeps a zero-weight update's NaN (0 * NaN = NaN) out of the accumulators.
            self._added += 1
            return
        transformed = self.transform(update)
        self._added += 1
        self._total_weight += effective
        for name, tensor in transformed.items():
            self._fold(name, tensor.detach(), effective, is_sum=False)

    def partial(self) -> Partial:
        """What the updates added so far give, for `merge` elsewhere; ends this instance as `result` does."""
        self._check_open("partial")
        self._finished = True
        accumulators = {name: acc.to(_CPU) for name, acc in self._acc.items()}
        self._acc.clear()
        return Partial(
            method=self.name,
            accumulators=accumulators,
            weights=dict(self._weights),
            num_added=self._added,
            total_weight=self._total_weight,
            counts=dict(self._counts),
        )

    def merge(self, partial: Partial) -> None:
        """Fold another batch's `partial` in, as if that batch's updates had been added here.

        Raises
        ------
        ValueError
            The partial comes from another method.
        UpdateMismatch
            An accumulator is unknown to the base model or is not of its accumulation dtype or shape.
        """
        self._check_open("merge")
        if partial.method != self.name:
            raise ValueError(f"cannot merge a {partial.method.value} partial into {self.name.value}")
        for name, acc in partial.accumulators.items():
            self._check(name, acc.dtype, acc.shape, what="partial accumulator", accumulator=True)
            weight = partial.weights.get(name)
            if weight is None or not math.isfinite(weight) or weight <= 0:
                raise InvalidWeight(f"partial accumulator {name!r} has weight {weight}")
        for name, acc in partial.accumulators.items():
            self._fold(name, acc, partial.weights[name], is_sum=True)
        self._added += partial.num_added
        self._total_weight += partial.total_weight
        for key, count in partial.counts.items():
            self.count(key, count)

    def result(self) -> Aggregate:
        """The round's outcome (see `finish`); callable once.

        The accumulators become the mean in place and are handed to `finish`, so taking the result
        needs no second model's worth of memory.

        Raises
        ------
        NothingToAggregate
            No update was added, or the weights added sum to 0.
        """
        self._check_open("result")
        if self._added == 0:
            raise NothingToAggregate("no update was added")
        if self._total_weight <= 0:
            raise NothingToAggregate(f"the {self._added} updates added have a total weight of 0")
        self._finished = True
        mean: dict[str, torch.Tensor] = {}
        for name, base in self._base.items():
            acc = self._acc.pop(name, None)
            if acc is None:
                mean[name] = self.unsent_value(name)
            else:
                mean[name] = _mean(acc, self._weights[name], base.dtype)
        return self.finish(mean)

    # Internals --------------------------------------------------------------------------------

    def _fold(self, name: str, tensor: torch.Tensor, weight: float, *, is_sum: bool) -> None:
        """Fold one tensor in: a value (`is_sum` False) or another batch's accumulator (True)."""
        self._weights[name] = total = self._weights.get(name, 0.0) + weight
        acc = self._acc.get(name)
        floating = self._base[name].dtype.is_floating_point
        if acc is None:
            acc = tensor.to(self._device, accumulation_dtype(self._base[name].dtype), copy=True)
            if not floating and not is_sum:
                acc.mul_(weight)
            self._acc[name] = acc
        elif floating:
            acc.lerp_(tensor.to(self._device, acc.dtype), weight / total)
        elif is_sum:
            acc.add_(tensor.to(self._device, acc.dtype))
        else:
            acc.add_(tensor.to(self._device, acc.dtype), alpha=weight)

    def _check(
        self,
        name: str,
        dtype: torch.dtype,
        shape: torch.Size,
        *,
        what: str,
        accumulator: bool = False,
    ) -> None:
        base = self._base.get(name)
        if base is None:
            raise UpdateMismatch(f"{what} {name!r} is not in the base model")
        expected = accumulation_dtype(base.dtype) if accumulator else base.dtype
        if dtype != expected:
            raise UpdateMismatch(f"{what} {name!r}: dtype {dtype}, expected {expected}")
        if shape != base.shape:
            raise UpdateMismatch(f"{what} {name!r}: shape {list(shape)}, the base has {list(base.shape)}")

    def _check_open(self, call: str) -> None:
        if self._finished:
            raise RuntimeError(
                f"{type(self).__name__}.{call}() after result() or partial(): build a new one per round"
            )


def _mean(acc: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Turn a tensor's accumulator into its mean, following the module's rules."""
    if dtype.is_floating_point:
        return acc
    if dtype == torch.bool:
        # weight / 2 is exact in binary floating point, so the threshold needs no division of `acc`.
        return acc >= weight / 2
    return acc.div_(weight).round_().to(dtype)
