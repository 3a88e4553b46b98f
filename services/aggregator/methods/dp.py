"""DP-FedAvg: the mean of clipped client deltas plus Gaussian noise (central differential privacy).

Formula
-------
With base model ``x``, client k's model ``w_k``, its delta ``D_k = w_k - x`` over all floating
tensors together, clip norm ``S`` and noise multiplier ``z``, over the ``n`` updates of the round::

    D_k' = D_k * min(1, S / ||D_k||_2)                (global L2 norm across tensors)
    x'   = x + (1/n) sum_k D_k' + N(0, sigma^2 I)     sigma = z S / n

McMahan, Ramage, Talwar, Zhang (2018), "Learning Differentially Private Recurrent Language
Models", ICLR, https://arxiv.org/abs/1710.06963 (Algorithm 1 with the fixed-denominator estimator
and flat clipping). The estimator's sensitivity is ``S / n`` only when every update counts the
same, so the clients' weights (numbers of examples) are ignored: each update with a positive
weight counts 1, a zero-weight update (a client that trained on nothing) counts 0. The privacy
accounting (epsilon over rounds) is the deployer's: `Aggregate.record` keeps ``clip_norm``,
``noise_multiplier``, ``noise_std``, ``num_updates`` and ``num_clipped`` for it.

Noise comes from a CPU `torch.Generator` seeded with `RoundContext.seed`, drawn tensor by tensor in
the base's order (float32, float64 for float64 tensors), so a round gives the same model on any
device. Deltas, clipping and noise are computed in float32 (float64 for float64 tensors); the model
is cast back to each tensor's dtype. Integer and bool tensors take FedAvg's value with equal
weights (no clipping, no noise). Every update must carry every tensor (a missing one would change
the sensitivity): an incomplete update is refused with `UpdateMismatch`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch

from services.aggregator.methods.base import Aggregate, UpdateMismatch
from services.aggregator.methods.linear import LinearMethod, accumulation_dtype
from shared.aggregation import AggregationMethod, DPFedAvgParams, MethodParams

_CLIPPED = "num_clipped"


class DPFedAvg(LinearMethod):
    """Unweighted mean of L2-clipped deltas plus seeded Gaussian noise (see the module doc)."""

    name: ClassVar[AggregationMethod] = AggregationMethod.DP_FEDAVG
    params_type: ClassVar[type[MethodParams]] = DPFedAvgParams
    params: DPFedAvgParams

    def weigh(self, weight: float) -> float:
        """Every update with a positive weight counts 1 (the fixed-denominator estimator)."""
        return 1.0 if weight > 0 else 0.0

    def transform(self, update: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The update's clipped delta (floating tensors) and its raw integer and bool tensors.

        The deltas are computed twice, once for the norm and once as they are accumulated, so that
        no second model's worth of memory is held.
        """
        missing = [name for name in self.base if name not in update]
        if missing:
            raise UpdateMismatch(f"DP-FedAvg needs every tensor; the update lacks {missing[:5]!r}")
        squares = 0.0
        for name, base in self.base.items():
            if base.dtype.is_floating_point:
                delta = _delta(self.base_on_device(name), update[name])
                squares += float(torch.linalg.vector_norm(delta)) ** 2
        norm = math.sqrt(squares)
        scale = 1.0
        if norm > self.params.clip_norm:
            scale = self.params.clip_norm / norm
            self.count(_CLIPPED)
        return _Deltas(self, update, scale)

    def unsent_value(self, name: str) -> torch.Tensor:
        """A tensor no update carried has a zero mean delta (floating) or keeps the base (others)."""
        base = self.base[name]
        if base.dtype.is_floating_point:
            return torch.zeros(base.shape, dtype=accumulation_dtype(base.dtype), device=self.ctx.device)
        return super().unsent_value(name)

    def finish(self, mean: dict[str, torch.Tensor]) -> Aggregate:
        """Add seeded noise of std ``z S / n`` to the mean delta, then the base."""
        p = self.params
        n = round(self.total_weight)
        std = p.noise_multiplier * p.clip_norm / n
        generator = torch.Generator(device="cpu").manual_seed(self.ctx.seed)
        for name, base in self.base.items():
            if not base.dtype.is_floating_point:
                continue
            delta = mean[name]
            if std > 0:
                noise = torch.randn(base.shape, generator=generator, dtype=delta.dtype)
                delta.add_(noise.to(delta.device), alpha=std)
            delta.add_(self.base_on_device(name))
        record = {
            "clip_norm": p.clip_norm,
            "noise_multiplier": p.noise_multiplier,
            "noise_std": std,
            "num_updates": n,
            "num_clipped": self.counts.get(_CLIPPED, 0),
        }
        return Aggregate(model=self.to_model(mean), record=record)


def _delta(base: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor - base`` on base's device and in its dtype (a new tensor)."""
    return torch.sub(tensor.detach().to(base.device, base.dtype), base)


class _Deltas(Mapping[str, torch.Tensor]):
    """An update's clipped deltas, each computed when it is read (integer and bool tensors as sent)."""

    def __init__(self, method: DPFedAvg, update: Mapping[str, torch.Tensor], scale: float) -> None:
        self._method = method
        self._update = update
        self._scale = scale

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._update[name]
        if not tensor.dtype.is_floating_point:
            return tensor
        delta = _delta(self._method.base_on_device(name), tensor)
        return delta.mul_(self._scale) if self._scale != 1.0 else delta

    def __iter__(self) -> Iterator[str]:
        return iter(self._update)

    def __len__(self) -> int:
        return len(self._update)
