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

Windows: `add_many` folds several updates at once. On the CPU, without a `transform`, each
accumulator is walked once per window in blocks (`FOLD_BLOCK`, `CONVERT_BLOCK` elements), each
block taking every update of the window (in order) while it is in cache: the accumulator crosses
the memory bus once per window instead of once per update. float16 and bfloat16 updates are
widened and folded in one pass by a fused kernel (`kernels.fold_half`, numba), four updates per
pass, no float32 copy of an update ever written; without numba they are converted a block at a
time into a reused float32 buffer. The kernel computes exactly torch's ``lerp_`` (same fma, same
rounding) and every path folds in the same order with the same weights, so windowed folds are
bit for bit those of sequential `add` calls. A caller
holding a window of W decoded updates holds W + 1 models (the pipeline's
``FEDHUB_AGGREGATOR_FOLD_WINDOW``).

An update may leave tensors out: a tensor's mean runs over the updates that carry it (its weight
renormalised per tensor); a tensor no update with a positive weight carried keeps
`unsent_value` (the base's value). A zero-weight update is counted but never accumulated, so its
values (even NaN) have no influence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from services.aggregator.methods.buffers import BufferLease
from services.aggregator.methods.kernels import fold_half
from shared.aggregation import AggregationMethod, MethodParams
from shared.errors import MalformedPayload

_ACCUMULATE_AS: Mapping[torch.dtype, torch.dtype] = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}

_CPU = torch.device("cpu")

FOLD_BLOCK = 1 << 20
"""Elements of an accumulator folded at once on the CPU when the updates have its dtype (4 MiB of
float32): a block stays in cache (L2 with two threads, else L3) while every update of a window is
folded into it. Larger than cache-line tuning alone would pick: each block and update is one torch
call, and with several torch threads each call is a parallel region whose threads wait for each
other, so fewer calls lose less when other processes take the cores."""
CONVERT_BLOCK = 1 << 18
"""Elements per block when float16 or bfloat16 updates are converted to a float32 accumulator
(a reused 1 MiB buffer): the conversion and the fold of a block happen while it is in cache."""


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
        self._on_cpu = ctx.device.type == "cpu"
        self._acc: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._total_weight = 0.0
        self._added = 0
        self._finished = False
        # Without a transform, updates enter the mean as they are: add_many folds them blockwise.
        self._plain = type(self).transform is LinearMethod.transform

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
        """Pop every base tensor out of `mean` cast to the base's dtype, on the CPU, in the base's order.

        A cast on the CPU (float32 means of a bfloat16 model) writes into a buffer of the round's lease.
        """
        model: dict[str, torch.Tensor] = {}
        for name, base in self._base.items():
            value = mean.pop(name)
            if value.device == _CPU and value.dtype != base.dtype:
                model[name] = self.ctx.buffers.empty(value.shape, base.dtype).copy_(value)
            else:
                model[name] = value.to(base.dtype).to(_CPU)
        return model

    # The contract -----------------------------------------------------------------------------

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold `update` in with weight `weight` (its number of examples), tensor by tensor.

        The same as ``add_many([update], [weight])``.

        Raises
        ------
        InvalidWeight
            `weight` is negative, NaN or infinite.
        UpdateMismatch
            A tensor is unknown to the base model or differs from it in dtype or shape.
        """
        self.add_many((update,), (weight,))

    def add_many(self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """Fold a window of updates in, in order: the same result as `add` for each in turn.

        Without a `transform` and on the CPU, each accumulator is walked once per window in blocks
        (`FOLD_BLOCK`, `CONVERT_BLOCK` elements), every update of the window folded into a block
        while it is in cache (one ``lerp_`` per update and block, in the order of `updates`, with
        the weights `add` would use: bit for bit the sequential result). With a `transform` the updates are
        folded one at a time, as `add` does.

        Every update is checked (see `check`) before any is folded, so a refused one leaves no
        trace; with a `transform` that refuses an update, those before it stay folded.

        Raises
        ------
        ValueError
            `updates` and `weights` differ in length.
        InvalidWeight, UpdateMismatch
            As `add`, for the first update that would be refused.
        """
        self._check_open("add")
        if len(updates) != len(weights):
            raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
        effective = [self.check(update, weight) for update, weight in zip(updates, weights, strict=True)]
        if not self._plain:
            for update, weight in zip(updates, effective, strict=True):
                if weight == 0:
                    # Skipping keeps a zero-weight update's NaN (0 * NaN = NaN) out of the accumulators.
                    self._added += 1
                    continue
                transformed = self.transform(update)
                self._added += 1
                self._total_weight += weight
                for name, tensor in transformed.items():
                    self._fold_values(name, [(tensor, weight)])
            return
        window = [(update, weight) for update, weight in zip(updates, effective, strict=True) if weight != 0]
        self._added += len(updates)
        for _, weight in window:
            self._total_weight += weight
        for name in self._base:
            values = [(update[name], weight) for update, weight in window if name in update]
            if values:
                self._fold_values(name, values)

    def check(self, update: Mapping[str, torch.Tensor], weight: float) -> float:
        """Refuse what `add` would refuse, folding nothing; the update's effective weight (`weigh`).

        A `transform` may still refuse an update `check` passed (DP-FedAvg: an incomplete update).

        Raises
        ------
        InvalidWeight
            `weight` is negative, NaN or infinite.
        UpdateMismatch
            A tensor is unknown to the base model or differs from it in dtype or shape.
        """
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidWeight(f"update weight must be a finite number >= 0, got {weight}")
        for name, tensor in update.items():
            self._check(name, tensor.dtype, tensor.shape, what="tensor")
        return self.weigh(weight)

    @property
    def folds_windows(self) -> bool:
        """True when `add_many` folds a window in one pass over the accumulators (the CPU, no
        `transform`): worth holding a few updates for. Otherwise it folds them one by one."""
        return self._plain and self._on_cpu

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
        accumulators = list(self._acc.values())
        mean: dict[str, torch.Tensor] = {}
        for name, base in self._base.items():
            acc = self._acc.pop(name, None)
            if acc is None:
                mean[name] = self.unsent_value(name)
            else:
                mean[name] = finish_mean(acc, self._weights[name], base.dtype)
        aggregate = self.finish(mean)
        _recycle(self.ctx.buffers, accumulators, aggregate)
        return aggregate

    # Internals --------------------------------------------------------------------------------

    def _fold(self, name: str, tensor: torch.Tensor, weight: float, *, is_sum: bool) -> None:
        """Fold one tensor in: a value (`is_sum` False) or another batch's accumulator (True)."""
        self._weights[name] = total = self._weights.get(name, 0.0) + weight
        acc = self._acc.get(name)
        floating = self._base[name].dtype.is_floating_point
        if acc is None:
            acc = self._new_accumulator(name, tensor)
            if not floating and not is_sum:
                acc.mul_(weight)
        elif floating:
            acc.lerp_(tensor.to(self._device, acc.dtype), weight / total)
        elif is_sum:
            acc.add_(tensor.to(self._device, acc.dtype))
        else:
            acc.add_(tensor.to(self._device, acc.dtype), alpha=weight)

    def _fold_values(self, name: str, values: Sequence[tuple[torch.Tensor, float]]) -> None:
        """Fold several updates' values of one tensor in, in order (weights positive).

        The same steps as `_fold` for each in turn: a floating tensor on the CPU goes through
        `_lerp_blocks`, anything else through `_fold`.
        """
        if not self._on_cpu or not self._base[name].dtype.is_floating_point:
            for tensor, weight in values:
                self._fold(name, tensor.detach(), weight, is_sum=False)
            return
        total = self._weights.get(name, 0.0)
        acc = self._acc.get(name)
        first: torch.Tensor | None = None
        steps: list[tuple[torch.Tensor, float]] = []
        for tensor, weight in values:
            total += weight
            x = tensor.detach() if tensor.requires_grad else tensor
            if acc is None:
                # The tensor's first value becomes its accumulator, copied block by block below.
                dtype = accumulation_dtype(self._base[name].dtype)
                acc = self._acc[name] = self.ctx.buffers.empty(x.shape, dtype)
                first = x
            else:
                steps.append((x, weight / total))
        if acc is None:  # no values
            return
        self._weights[name] = total
        _lerp_blocks(acc, steps, first=first)

    def _new_accumulator(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `tensor` in the tensor's accumulation dtype, kept as its accumulator."""
        dtype = accumulation_dtype(self._base[name].dtype)
        acc = tensor.to(self._device, dtype, copy=True, memory_format=torch.contiguous_format)
        self._acc[name] = acc
        return acc

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


def _lerp_blocks(
    acc: torch.Tensor, steps: Sequence[tuple[torch.Tensor, float]], *, first: torch.Tensor | None = None
) -> None:
    """``acc.copy_(first)`` if given, then ``acc.lerp_(x, f)`` for each ``(x, f)`` of `steps` in turn.

    `FOLD_BLOCK` elements at a time: every step is applied to an accumulator block before the next
    block is touched, so the accumulator crosses the memory bus once per call, not once per step.
    float16 and bfloat16 values go through the fused kernel (`kernels.fold_half`, bit for bit
    torch's lerp) where numba is installed; otherwise an `x` of another dtype is converted
    `CONVERT_BLOCK` elements at a time into a reused buffer. Element by element the operations
    are those of whole-tensor calls.
    """
    if first is not None:
        first = first.to(acc.device)
    sources = [(x.to(acc.device), f) for x, f in steps]
    convert = any(x.dtype != acc.dtype for x, _ in sources)
    if convert and fold_half(acc, sources, first=first):
        return
    n = acc.numel()
    passes = len(sources) + (first is not None)
    if not acc.is_contiguous() or n == 0 or (not convert and (n <= FOLD_BLOCK or passes <= 1)):
        # One block or one pass anyway: whole-tensor calls.
        if first is not None:
            acc.copy_(first)
        for x, f in sources:
            acc.lerp_(x.to(acc.dtype), f)
        return
    block = min(CONVERT_BLOCK if convert else FOLD_BLOCK, n)
    blocks = torch.split(acc.view(-1), block)
    firsts = None if first is None else torch.split(first.reshape(-1), block)
    columns = [(torch.split(x.reshape(-1), block), f) for x, f in sources]
    buffer = torch.empty(block, dtype=acc.dtype, device=acc.device) if convert else None
    for j, a in enumerate(blocks):
        if firsts is not None:
            a.copy_(firsts[j])
        scratch = None if buffer is None else buffer if a.numel() == block else buffer[: a.numel()]
        for column, f in columns:
            x = column[j]
            if scratch is not None:
                x = scratch.copy_(x)
            a.lerp_(x, f)


def _recycle(buffers: BufferLease, accumulators: Sequence[torch.Tensor], aggregate: Aggregate) -> None:
    """Give back the accumulators the outcome does not hold (by storage: views count as held); the
    method is finished, so nothing else reads them. Those it holds go back once it is stored."""
    held = {
        t.untyped_storage().data_ptr()
        for tensors in (aggregate.model, aggregate.state, *aggregate.members)
        for t in tensors.values()
    }
    buffers.give_back(acc for acc in accumulators if acc.untyped_storage().data_ptr() not in held)


def finish_mean(acc: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Turn a tensor's accumulator into its mean, following the module's rules.

    Floating accumulators hold the mean already; integer and bool ones hold the float64 weighted sum
    (consumed: divided in place).
    """
    if dtype.is_floating_point:
        return acc
    if dtype == torch.bool:
        # weight / 2 is exact in binary floating point, so the threshold needs no division of `acc`.
        return acc >= weight / 2
    return acc.div_(weight).round_().to(dtype)
