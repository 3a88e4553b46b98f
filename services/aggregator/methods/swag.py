"""SWAG moments: FedAvg of every tensor, then each second moment kept at least its mean's square.

Formula
-------
Clients keep SWA-Gaussian statistics of their weights: a first moment ``<name>`` (the running mean
of the iterates) and a second moment ``<name><suffix>`` (the running mean of their squares), with
``suffix`` the training's ``second_moment_suffix`` (default ``.sq_mean``). Both are moments, so the
server's sample-size weighted mean of them is the moment over all clients' iterates::

    mean_k   = sum_k n_k <name>_k        / sum_k n_k
    sq_mean  = sum_k n_k <name><suffix>_k / sum_k n_k
    sq_mean  = max(sq_mean, mean^2)                 (element-wise)

The clamp keeps the variance ``sq_mean - mean^2`` non-negative where rounding (or a client's
inconsistent statistics) would make it negative; the mean it compares with is the first moment as
stored (rounded to its dtype), computed in the second moment's accumulation dtype. A pair counts
when both tensors are floating and of the same shape. `Aggregate.record` keeps ``num_pairs`` and
``num_clamped`` (elements raised). Every other tensor, and every dtype rule, is FedAvg's.

Maddox, Garipov, Izmailov, Vetrov, Wilson (2019), "A Simple Baseline for Bayesian Uncertainty in
Deep Learning", NeurIPS, https://arxiv.org/abs/1902.02476 (SWAG's first and second moments).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from services.aggregator.methods.base import Aggregate
from services.aggregator.methods.linear import LinearMethod
from shared.aggregation import AggregationMethod, MethodParams, SwagParams


class Swag(LinearMethod):
    """FedAvg of the SWAG moments, second moments clamped to at least the mean's square."""

    name: ClassVar[AggregationMethod] = AggregationMethod.SWAG
    params_type: ClassVar[type[MethodParams]] = SwagParams
    params: SwagParams

    def finish(self, mean: dict[str, torch.Tensor]) -> Aggregate:
        """Clamp each pair's second moment (in place), then the model as FedAvg's."""
        suffix = self.params.second_moment_suffix
        pairs = clamped = 0
        for name, base in self.base.items():
            second_base = self.base.get(name + suffix)
            if (
                second_base is None
                or not base.dtype.is_floating_point
                or not second_base.dtype.is_floating_point
                or second_base.shape != base.shape
            ):
                continue
            pairs += 1
            second = mean[name + suffix]
            first = mean[name].to(base.dtype).to(second.dtype)
            floor = first.mul_(first) if first is not mean[name] else first * first
            clamped += int(torch.count_nonzero(second < floor))
            torch.maximum(second, floor, out=second)
        return Aggregate(model=self.to_model(mean), record={"num_pairs": pairs, "num_clamped": clamped})
