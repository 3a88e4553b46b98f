"""Krum, Multi-Krum and Bulyan: select the updates closest to their neighbours, then combine them.

Formulas
--------
Over the round's ``n`` updates of positive weight, with ``d(i, j) = ||x_i - x_j||^2`` the squared L2
distance over all floating tensors::

    score(i) = sum of the n - f - 2 smallest d(i, j), j != i
    Krum        the update of the lowest score                      (needs n > 2f + 2)
    Multi-Krum  the sample-weighted mean (FedAvg's rule) of the m updates of the lowest scores,
                m = n - f unless given                              (needs n > 2f + 2, m <= n)
    Bulyan      theta = n - 2f updates selected by Krum applied again and again to those not yet
                selected; then per coordinate, of the theta selected values, the mean of the
                beta = theta - 2f closest to their median             (needs n >= 4f + 3)

Blanchard, El Mhamdi, Guerraoui, Stainer (2017), "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS, https://arxiv.org/abs/1703.02757 (Krum, Multi-Krum).
El Mhamdi, Guerraoui, Rouault (2018), "The Hidden Vulnerability of Distributed Learning in
Byzantium", ICML, https://arxiv.org/abs/1802.07927 (Bulyan).

Details
-------
- Ties of scores go to the update added first. Multi-Krum averages as Flower's ``aggregate_krum``
  with ``to_keep``: weighted by the number of examples.
- Bulyan's repeated Krum over ``r`` remaining updates sums the ``clamp(r - f - 2, 1, r - 1)``
  smallest distances (the paper's count falls below 1 in the last selections). Its coordinate step
  is unweighted; the ``beta`` values closest to the median are a window of the sorted values, and
  a tie of distances goes to the smaller value. The median of an even count is the mean of the two
  middle values.
- Integer and bool tensors: Krum takes the selected update's; Multi-Krum and Bulyan apply FedAvg's
  rule (weighted mean rounded half to even; bool: weighted share >= 0.5) over the selected updates.
- Updates of weight 0 take no part (and do not count in n); `Aggregate.record` holds ``selected``
  (positions in the order of `add`, ascending), ``scores`` (one per added update, in that order:
  the Krum score, None for a zero-weight update) and ``n`` and ``f``.

Precision and memory
--------------------
Distances are accumulated in float64 over chunks of the concatenated floating tensors: each chunk's
``[n, L]`` block is converted to float64 and centred on its column means (distances do not change,
but ``||x||^2`` no longer dwarfs ``||x_i - x_j||^2``), then ``D += diag(G) + diag(G)^T - 2 G`` with
the Gram matrix ``G = X X^T``. Memory: every update of positive weight is held (n x the model) plus
an ``[n, L]`` float64 block (L = 2^21 / n elements).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from services.aggregator.methods.base import Aggregate, Method, RoundContext, TooFewUpdates
from services.aggregator.methods.coordinate import (
    HeldUpdates,
    RowReducer,
    coordinate_reduce,
    plan_chunks,
    sort_rows,
    weighted_mean_rule,
)
from services.aggregator.methods.fedavg import FedAvg
from shared.aggregation import (
    AggregationMethod,
    BulyanParams,
    FedAvgParams,
    KrumParams,
    MethodParams,
    MultiKrumParams,
)

_DISTANCE_BLOCK = 1 << 21
"""Elements (all updates together) of the float64 block the distances are computed over."""


def pairwise_sq_distances(
    updates: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str], device: torch.device
) -> torch.Tensor:
    """Squared L2 distances between updates over the tensors `names`, float64 [n, n] on the CPU."""
    n = len(updates)
    dist = torch.zeros((n, n), dtype=torch.float64, device=device)
    if n == 0 or not names:
        return dist.cpu()
    sizes = [(name, updates[0][name].numel()) for name in names]
    total = sum(size for _, size in sizes)
    if total == 0:
        return dist.cpu()
    length = max(1, min(total, _DISTANCE_BLOCK // n))
    block = torch.empty((n, length), dtype=torch.float64, device=device)
    flat = [{name: u[name].reshape(-1) for name in names} for u in updates]
    for pieces, size in plan_chunks(sizes, length):
        x = block[:, :size]
        for row, f in zip(x, flat, strict=True):
            for name, start, stop, offset in pieces:
                row[offset : offset + stop - start].copy_(f[name][start:stop])
        x.sub_(x.mean(dim=0, keepdim=True))
        gram = x @ x.T
        sq = gram.diagonal()
        dist.add_(sq[:, None] + sq[None, :] - 2 * gram)
    # x @ x.T need not come out exactly symmetric (the BLAS kernel's summation order differs per
    # element), and iterated Krum ends on exact ties (two left: each one's score is the distance to
    # the other): averaged with its transpose, d(a, b) == d(b, a) bit for bit, so such ties stay
    # ties and go to the lower position, whatever the BLAS.
    dist = (dist + dist.T) / 2
    dist.clamp_(min=0).fill_diagonal_(0)
    return dist.cpu()


def krum_scores(dist: torch.Tensor, members: Sequence[int], f: int) -> dict[int, float]:
    """Krum's score of each of `members` (rows of `dist`) within that set (see the module doc)."""
    r = len(members)
    if r == 1:
        return {members[0]: 0.0}
    closest = min(r - 1, max(1, r - f - 2))
    index = torch.tensor(list(members))
    sub = dist[index][:, index]
    sub.fill_diagonal_(float("inf"))
    sums = torch.sort(sub, dim=1).values[:, :closest].sum(dim=1)
    return dict(zip(members, sums.tolist(), strict=True))


def lowest(scores: Mapping[int, float], count: int) -> list[int]:
    """The `count` members of the lowest scores, ties to the lower position."""
    return sorted(scores, key=lambda i: (scores[i], i))[:count]


class _Selecting(Method):
    """Shared parts of Krum, Multi-Krum and Bulyan: held updates, the n check, distances, the record."""

    holds_updates = True
    shardable = False

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self._held = HeldUpdates(ctx.base, self.name.value)

    @property
    def _f(self) -> int:
        assert isinstance(self.params, KrumParams | MultiKrumParams | BulyanParams)
        return self.params.f

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Keep `update` (weight 0: checked and left out); may raise `InvalidWeight` or `UpdateMismatch`."""
        self._held.add(update, weight)

    def _distances(self) -> torch.Tensor:
        floats = [name for name, t in self.ctx.base.items() if t.dtype.is_floating_point]
        return pairwise_sq_distances(self._held.updates, floats, self.ctx.device)

    def _record(self, scores: Mapping[int, float], selected: Sequence[int]) -> dict[str, object]:
        """JSON-able record; `scores` and `selected` are positions among the held updates."""
        held = self._held
        by_add: list[float | None] = [None] * held.added
        for pos, score in scores.items():
            by_add[held.indices[pos]] = score
        return {
            "n": len(held.updates),
            "f": self._f,
            "selected": sorted(held.indices[pos] for pos in selected),
            "scores": by_add,
        }

    def _too_few(self, needed: str) -> TooFewUpdates:
        n = len(self._held.updates)
        return TooFewUpdates(
            f"{self.name.value} with f={self._f} needs {needed} updates of positive weight; "
            f"the round has {n} (of {self._held.added} added)"
        )


class Krum(_Selecting):
    """Krum: the one update closest to its n - f - 2 nearest neighbours (see the module doc)."""

    name = AggregationMethod.KRUM
    params_type = KrumParams

    def result(self) -> Aggregate:
        """The selected update as the model (CPU copies); raises `TooFewUpdates` unless n > 2f + 2."""
        held = self._held
        held.take()
        n, f = len(held.updates), self._f
        if n <= 2 * f + 2:
            raise self._too_few(f"more than 2f + 2 = {2 * f + 2}")
        scores = krum_scores(self._distances(), range(n), f)
        (best,) = lowest(scores, 1)
        model = {name: t.to("cpu", copy=True) for name, t in held.updates[best].items()}
        record = self._record(scores, [best])
        held.release()
        return Aggregate(model={name: model[name] for name in self.ctx.base}, record=record)


class MultiKrum(_Selecting):
    """Multi-Krum: the weighted mean of the m updates of the lowest Krum scores (see the module doc)."""

    name = AggregationMethod.MULTI_KRUM
    params_type = MultiKrumParams

    def result(self) -> Aggregate:
        """FedAvg of the selected updates; raises `TooFewUpdates` unless n > 2f + 2 and m <= n."""
        assert isinstance(self.params, MultiKrumParams)
        held = self._held
        held.take()
        n, f = len(held.updates), self._f
        if n <= 2 * f + 2:
            raise self._too_few(f"more than 2f + 2 = {2 * f + 2}")
        m = self.params.m if self.params.m is not None else n - f
        if m > n:
            raise self._too_few(f"at least m = {m}")
        scores = krum_scores(self._distances(), range(n), f)
        selected = sorted(lowest(scores, m))
        model = _fedavg([held.updates[i] for i in selected], [held.weights[i] for i in selected], self.ctx)
        record = {**self._record(scores, selected), "m": m}
        held.release()
        return Aggregate(model=model, record=record)


class Bulyan(_Selecting):
    """Bulyan: repeated Krum selects theta = n - 2f, then a coordinate-wise mean around the median."""

    name = AggregationMethod.BULYAN
    params_type = BulyanParams

    def result(self) -> Aggregate:
        """Bulyan's model (see the module doc); raises `TooFewUpdates` unless n >= 4f + 3."""
        held = self._held
        held.take()
        n, f = len(held.updates), self._f
        if n < 4 * f + 3:
            raise self._too_few(f"at least 4f + 3 = {4 * f + 3}")
        dist = self._distances()
        first = krum_scores(dist, range(n), f)
        theta, beta = n - 2 * f, n - 4 * f
        remaining = list(range(n))
        chosen: list[int] = []
        for _ in range(theta):
            (best,) = lowest(krum_scores(dist, remaining, f), 1)
            chosen.append(best)
            remaining.remove(best)
        chosen.sort()
        base, device = self.ctx.base, self.ctx.device
        updates = [held.updates[i] for i in chosen]
        floats = [name for name, t in base.items() if t.dtype.is_floating_point]
        out = coordinate_reduce(updates, floats, base, device, _closest_to_median(theta, beta))
        for name, t in base.items():
            if not t.dtype.is_floating_point:
                weights = [held.weights[i] for i in chosen]
                out[name] = weighted_mean_rule([u[name] for u in updates], weights, t.dtype, device)
        record = {**self._record(first, chosen), "theta": theta, "beta": beta}
        held.release()
        return Aggregate(model={name: out[name].to("cpu") for name in base}, record=record)


def _closest_to_median(theta: int, beta: int) -> RowReducer:
    """Per coordinate: the mean of the `beta` of `theta` values closest to their median.

    The values sorted, the closest ones are the window [a, a + beta) for the smallest a with
    |s[a + beta] - med| >= |s[a] - med| (or a = theta - beta): moving the window up would trade s[a]
    for a value no closer.
    """
    everything = tuple(range(theta))
    last = theta - beta

    def reduce(rows: list[torch.Tensor], spare: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
        rows, spare = sort_rows(rows, spare, everything)
        lo, hi = rows[(theta - 1) // 2], rows[theta // 2]
        median = lo.clone() if lo is hi else torch.add(lo, hi).mul_(0.5)
        start = torch.full_like(out, float(last))
        for a in range(last - 1, -1, -1):
            keep_low = (rows[a + beta] - median).abs_() >= (rows[a] - median).abs_()
            start = torch.where(keep_low, float(a), start)
        # Summed as differences to the median: exact when the values are equal, and close values
        # lose no digits to their common part.
        out.zero_()
        for j, row in enumerate(rows):
            inside = (start <= j) & (start > j - beta)
            out.add_(torch.where(inside, row - median, 0.0))
        out.div_(beta).add_(median)
        return rows

    return reduce


def _fedavg(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], ctx: RoundContext
) -> dict[str, torch.Tensor]:
    """FedAvg's weighted mean of `updates`."""
    method = FedAvg(ctx, FedAvgParams())
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    return method.result().model
