"""Federated averaging (FedAvg) as a streaming accumulator over whole state dicts.

Formula
-------
For each tensor, with client k's value ``w_k`` and weight ``n_k`` (its number of examples)::

    w_new = sum_k n_k w_k / sum_k n_k

McMahan, Moore, Ramage, Hampson, Agüera y Arcas (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS, https://arxiv.org/abs/1602.05629 (Algorithm 1).

Rules by dtype
--------------
The whole state dict is averaged, buffers included.

- float32, float16, bfloat16: accumulated in float32; the mean is cast back to the tensor's dtype
  (round to nearest).
- float64: accumulated and returned in float64.
- integer dtypes: the weighted mean (from a float64 sum, exact below 2**53) rounded to the nearest
  integer with ties to even (``torch.round``), in the tensor's dtype. This is what counters such as
  BatchNorm's ``num_batches_tracked`` need.
- bool: True where the weighted share of True is at least 0.5, i.e. ``sum_{k: w_k} n_k >= sum_k n_k / 2``.

How it accumulates
------------------
Floating tensors keep the running weighted mean ``m_k = m_{k-1} + (n_k / N_k) (w_k - m_{k-1})`` with
``N_k = n_1 + ... + n_k`` (one in-place ``lerp_`` per tensor), which is the running sum divided by
the weight so far: the same formula, but one client's tensor or identical tensors come out bit for
bit, and ``n_k w_k`` never overflows a float32. Integer and bool tensors keep the float64 running sum
``sum_k n_k w_k``, so their rounding and threshold are exact.

Partial updates
---------------
An update may leave tensors out (a training's excluded variables). A tensor's mean runs only over
the clients that sent it, so ``n_k`` is renormalised per tensor; a tensor no client sent with a
positive weight keeps the base model's value. Unknown names, or another dtype or shape than the
base's, are refused with `UpdateMismatch` before anything of that update is accumulated.

Memory
------
One accumulator per tensor, allocated at the tensor's first contribution: about one model (in the
accumulation dtypes) whatever the number of clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from services.aggregator.methods.base import (
    InvalidWeight,
    NothingToAggregate,
    StreamingMethod,
    UpdateMismatch,
)

_ACCUMULATE_AS: Mapping[torch.dtype, torch.dtype] = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of `dtype` accumulates in (float64 for integers and bool, see the module doc)."""
    return _ACCUMULATE_AS.get(dtype, torch.float64)


class FedAvg(StreamingMethod):
    """Weighted mean of client state dicts, accumulated one update at a time (see the module doc)."""

    def __init__(self, base: Mapping[str, torch.Tensor], device: torch.device) -> None:
        self._base = {name: t.detach() for name, t in base.items()}
        self._device = device
        self._acc: dict[str, torch.Tensor] = {}
        self._weights: dict[str, float] = {}
        self._total_weight = 0.0
        self._added = 0
        self._finished = False

    @property
    def num_added(self) -> int:
        """How many updates were added (zero-weight ones included)."""
        return self._added

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total_weight

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold `update` in with weight `weight` (its number of examples), tensor by tensor.

        Raises
        ------
        InvalidWeight
            `weight` is negative, NaN or infinite.
        UpdateMismatch
            A tensor is unknown to the base model or differs from it in dtype or shape.
        """
        if self._finished:
            raise RuntimeError("FedAvg.add() after result(): build a new accumulator per round")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise InvalidWeight(f"update weight must be a finite number >= 0, got {weight}")
        # Check everything first so that a refused update leaves no partial trace.
        for name, tensor in update.items():
            self._check(name, tensor)
        self._added += 1
        self._total_weight += weight
        if weight == 0:
            # Skipping also keeps a zero-weight update's NaN (0 * NaN = NaN) out of the accumulators.
            return
        for name, tensor in update.items():
            seen = self._weights.get(name, 0.0)
            self._weights[name] = total = seen + weight
            acc = self._acc.get(name)
            if acc is None:
                acc = tensor.detach().to(self._device, accumulation_dtype(tensor.dtype), copy=True)
                if not tensor.dtype.is_floating_point:
                    acc.mul_(weight)
                self._acc[name] = acc
            elif tensor.dtype.is_floating_point:
                acc.lerp_(tensor.detach().to(self._device, acc.dtype), weight / total)
            else:
                acc.add_(tensor.detach().to(self._device, acc.dtype), alpha=weight)

    def result(self) -> dict[str, torch.Tensor]:
        """The averaged state dict on the CPU, in the base's tensor order; callable once.

        The accumulators are turned into the result in place and released one by one, so taking
        the result needs no second model's worth of memory.

        Raises
        ------
        NothingToAggregate
            No update was added, or the weights added sum to 0.
        """
        if self._finished:
            raise RuntimeError("FedAvg.result() was already taken")
        if self._added == 0:
            raise NothingToAggregate("no update was added")
        if self._total_weight <= 0:
            raise NothingToAggregate(f"the {self._added} updates added have a total weight of 0")
        self._finished = True
        out: dict[str, torch.Tensor] = {}
        for name, base in self._base.items():
            acc = self._acc.pop(name, None)
            if acc is None:
                out[name] = base.to("cpu", copy=True)
                continue
            out[name] = _mean(acc, self._weights[name], base.dtype).to("cpu")
        return out

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        base = self._base.get(name)
        if base is None:
            raise UpdateMismatch(f"tensor {name!r} is not in the base model")
        if tensor.dtype != base.dtype:
            raise UpdateMismatch(f"tensor {name!r}: dtype {tensor.dtype}, the base model has {base.dtype}")
        if tensor.shape != base.shape:
            raise UpdateMismatch(
                f"tensor {name!r}: shape {list(tensor.shape)}, the base model has {list(base.shape)}"
            )


def _mean(acc: torch.Tensor, weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Turn a tensor's accumulator into its mean in `dtype`, following the module's rules."""
    if dtype.is_floating_point:
        return acc.to(dtype)
    if dtype == torch.bool:
        # weight / 2 is exact in binary floating point, so the threshold needs no division of `acc`.
        return acc >= weight / 2
    return acc.div_(weight).round_().to(dtype)
