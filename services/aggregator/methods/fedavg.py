"""Federated averaging (FedAvg) and FedProx's server side: the weighted mean of the clients' models.

Formula
-------
For each tensor, with client k's value ``w_k`` and weight ``n_k`` (its number of examples)::

    w_new = sum_k n_k w_k / sum_k n_k

McMahan, Moore, Ramage, Hampson, Agüera y Arcas (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS, https://arxiv.org/abs/1602.05629 (Algorithm 1).

FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith (2020), "Federated Optimization in
Heterogeneous Networks", MLSys, https://arxiv.org/abs/1812.06127) changes only the clients'
objective (a proximal term ``mu/2 ||w - w_t||^2``); its server step is FedAvg's, and its `mu` is
sent to the clients.

Rules by dtype
--------------
The whole state dict is averaged, buffers included, as `LinearMethod` accumulates it:

- float32, float16, bfloat16: accumulated in float32; the mean is cast back to the tensor's dtype
  (round to nearest).
- float64: accumulated and returned in float64.
- integer dtypes: the weighted mean (from a float64 sum, exact below 2**53) rounded to the nearest
  integer with ties to even (``torch.round``), in the tensor's dtype. This is what counters such as
  BatchNorm's ``num_batches_tracked`` need.
- bool: True where the weighted share of True is at least 0.5, i.e. ``sum_{k: w_k} n_k >= sum_k n_k / 2``.

Memory and speed
----------------
One accumulator per tensor, allocated at the tensor's first contribution: about one model (in the
accumulation dtypes) whatever the number of clients. A float32 update on a CPU device is folded in
with in-place ``lerp_`` calls, without a copy (only a tensor's first update is copied, into its
accumulator). `add_many` folds a window of updates in one pass over the accumulators, in blocks
that stay in cache while every update of the window goes into them, and converts float16 and
bfloat16 updates a block at a time (see `LinearMethod.add_many`): bit for bit the result of one
`add` per update. The round pipeline holds ``FEDHUB_AGGREGATOR_FOLD_WINDOW`` decoded updates
(default 4) before folding them: window + 1 models in memory, whatever the number of clients.
"""

from __future__ import annotations

from typing import ClassVar

from services.aggregator.methods.linear import LinearMethod, accumulation_dtype
from shared.aggregation import AggregationMethod, FedAvgParams, FedProxParams, MethodParams

__all__ = ["FedAvg", "FedProx", "accumulation_dtype"]


class FedAvg(LinearMethod):
    """Weighted mean of client state dicts, accumulated one update at a time (see the module doc)."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDAVG
    params_type: ClassVar[type[MethodParams]] = FedAvgParams


class FedProx(LinearMethod):
    """FedProx's server step: FedAvg (the proximal term `mu` acts on the clients)."""

    name: ClassVar[AggregationMethod] = AggregationMethod.FEDPROX
    params_type: ClassVar[type[MethodParams]] = FedProxParams
