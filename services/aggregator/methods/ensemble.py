"""Ensemble: the round keeps every client model as a member, and their FedAvg mean as the model.

Formula
-------
``members = [w_1, ..., w_K]`` (every added update, in the order of `add`, zero-weight ones included),
and so that training can go on, ``model = sum_k n_k w_k / sum_k n_k`` with FedAvg's rules by dtype
(floats averaged in float32 or float64; integers: the weighted mean rounded half to even; bool: True
where the weighted share of True is at least 0.5).

Lakshminarayanan, Pritzel, Blundell (2017), "Simple and Scalable Predictive Uncertainty Estimation
using Deep Ensembles", NeurIPS, https://arxiv.org/abs/1612.01474: the members are what a client
downloads as a set to predict with their average and spread.

Memory
------
A CPU copy of every update (K x the model) plus FedAvg's accumulator (one model).
`Aggregate.record` holds ``members``, their count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from services.aggregator.methods.base import Aggregate, Method, RoundContext
from services.aggregator.methods.coordinate import HeldUpdates
from services.aggregator.methods.fedavg import FedAvg
from shared.aggregation import AggregationMethod, EnsembleParams, FedAvgParams, MethodParams


class Ensemble(Method):
    """Keep every update as an ensemble member; the model is their sample-weighted mean."""

    name = AggregationMethod.ENSEMBLE
    params_type = EnsembleParams
    holds_updates = True
    shardable = False

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self._held = HeldUpdates(ctx.base, self.name.value, keep_zero_weight=True)
        self._mean = FedAvg(ctx, FedAvgParams())

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Copy `update` to the CPU as a member and fold it into the mean; may raise `InvalidWeight`."""
        self._held.add(update, weight)
        member = {name: t.to("cpu", copy=True) for name, t in self._held.updates[-1].items()}
        self._held.updates[-1] = member
        self._mean.add(member, weight)

    def result(self) -> Aggregate:
        """Members in the order of `add` and their weighted mean; raises `NothingToAggregate`."""
        self._held.take()
        model = self._mean.result().model
        members = self._held.updates
        self._held.release()
        return Aggregate(model=model, members=members, record={"members": len(members)})
