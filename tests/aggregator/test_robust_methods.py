"""The robust family (median, trimmed mean, Krum, Multi-Krum, Bulyan) and the ensemble.

Each method is checked against a plain float64 numpy reference written here, on random inputs and
on edge cases (one client, a zero-weight client, identical updates, f at its maximum); the
coordinate-wise methods over a subset of tensors against the same tensors of the full result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import pytest
import torch

from services.aggregator.methods import (
    METHODS,
    Bulyan,
    Ensemble,
    InvalidWeight,
    Krum,
    Median,
    Method,
    MultiKrum,
    NothingToAggregate,
    RoundContext,
    TooFewUpdates,
    TrimmedMean,
    UpdateMismatch,
    coordinate,
)
from services.aggregator.methods.coordinate import plan_chunks, sort_rows, sorting_network
from services.aggregator.methods.krum import pairwise_sq_distances
from shared.aggregation import (
    AggregationMethod,
    BulyanParams,
    EnsembleParams,
    KrumParams,
    MedianParams,
    MethodParams,
    MultiKrumParams,
    TrimmedMeanParams,
)

CPU = torch.device("cpu")
State = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]


def random_state(gen: torch.Generator, scale: float = 1.0) -> State:
    """A state dict with float32/float64/float16/bfloat16, int64 and bool tensors."""
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=gen) * scale,
        "fc.weight": torch.randn(6, 5, generator=gen, dtype=torch.float64) * scale,
        "fc.bias": (torch.randn(6, generator=gen) * scale).to(torch.float16),
        "emb": (torch.randn(5, 4, generator=gen) * scale).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=gen),
        "mask": torch.rand(7, generator=gen) > 0.5,
    }


def zeros_like(state: State) -> State:
    """A base model of the same spec."""
    return {name: torch.zeros_like(t) for name, t in state.items()}


def ctx_for(base: State) -> RoundContext:
    """A CPU round context over `base`."""
    return RoundContext(base=base, device=CPU)


def run(cls: type[Method], params: MethodParams, updates: list[State], weights: list[float]):
    """Build the method over a zero base of the updates' spec, add everything, take the result."""
    method = cls(ctx_for(zeros_like(updates[0])), params)
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    return method.result()


def f64(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as float64 numpy."""
    return t.to(torch.float64).numpy()


def stack(updates: list[State], name: str) -> np.ndarray:
    """The updates' tensor `name` stacked along a new first axis, float64."""
    return np.stack([f64(u[name]) for u in updates])


# --- float64 references -----------------------------------------------------------------------


def ref_weighted_rule(values: np.ndarray, weights: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """FedAvg's rule for integer/bool tensors: weighted mean rounded half to even; bool share >= 0.5."""
    total = weights.sum()
    acc = np.asarray(np.tensordot(weights, values, axes=1))
    if dtype == torch.bool:
        return np.asarray(acc >= total / 2)
    return np.asarray(np.round(acc / total))  # numpy rounds half to even


def ref_coordinatewise(updates: list[State], weights: list[float], reduce) -> Arrays:
    """`reduce` over axis 0 for floating tensors (positive-weight updates), the weighted rule elsewhere."""
    kept = [u for u, w in zip(updates, weights, strict=True) if w > 0]
    w = np.array([w for w in weights if w > 0], dtype=np.float64)
    out = {}
    for name, t in kept[0].items():
        values = stack(kept, name)
        out[name] = reduce(values) if t.dtype.is_floating_point else ref_weighted_rule(values, w, t.dtype)
    return out


def ref_trimmed(values: np.ndarray, beta: float) -> np.ndarray:
    """Sort per coordinate, cut floor(beta K) from each end, average the rest."""
    k = values.shape[0]
    cut = int(Fraction(repr(beta)) * k)
    return np.asarray(np.sort(values, axis=0)[cut : k - cut].mean(axis=0))


def flat_floats(update: State) -> np.ndarray:
    """Every floating tensor of an update concatenated, float64."""
    return np.concatenate([f64(t).ravel() for t in update.values() if t.dtype.is_floating_point])


def ref_distances(updates: list[State]) -> np.ndarray:
    """Squared L2 distances computed from the differences directly."""
    flats = [flat_floats(u) for u in updates]
    n = len(flats)
    return np.array([[np.sum((flats[i] - flats[j]) ** 2) for j in range(n)] for i in range(n)])


def ref_scores(dist: np.ndarray, members: list[int], f: int) -> dict[int, float]:
    """Krum scores within `members`: sum of the clamp(r - f - 2, 1, r - 1) nearest others."""
    r = len(members)
    if r == 1:
        return {members[0]: 0.0}
    closest = min(r - 1, max(1, r - f - 2))
    return {i: float(np.sort([dist[i, j] for j in members if j != i])[:closest].sum()) for i in members}


def ref_best(scores: dict[int, float]) -> int:
    """Lowest score, ties to the lower index."""
    return min(scores, key=lambda i: (scores[i], i))


def ref_weighted_mean(updates: list[State], weights: list[float]) -> Arrays:
    """FedAvg in float64 with the integer/bool rule."""
    w = np.array(weights, dtype=np.float64)
    out = {}
    for name, t in updates[0].items():
        values = stack(updates, name)
        if t.dtype.is_floating_point:
            out[name] = np.tensordot(w, values, axes=1) / w.sum()
        else:
            out[name] = ref_weighted_rule(values, w, t.dtype)
    return out


def ref_bulyan(updates: list[State], weights: list[float], f: int) -> tuple[Arrays, list[int]]:
    """Iterated Krum selects n - 2f; per coordinate the mean of the n - 4f values nearest the median."""
    n = len(updates)
    dist = ref_distances(updates)
    remaining, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        best = ref_best(ref_scores(dist, remaining, f))
        chosen.append(best)
        remaining.remove(best)
    chosen.sort()
    beta = n - 4 * f

    def nearest_median(values: np.ndarray) -> np.ndarray:
        ordered = np.sort(values, axis=0)
        med = np.median(ordered, axis=0)
        # A stable sort of the distances over the sorted values: ties go to the smaller value.
        order = np.argsort(np.abs(ordered - med), axis=0, kind="stable")[:beta]
        return np.asarray(np.take_along_axis(ordered, order, axis=0).mean(axis=0))

    sel = [updates[i] for i in chosen]
    return ref_coordinatewise(sel, [weights[i] for i in chosen], nearest_median), chosen


# --- comparing --------------------------------------------------------------------------------

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (2**-10, 2**-12),
    torch.bfloat16: (2**-7, 2**-10),
}


def assert_matches(model: State, expected: Arrays, like: State) -> None:
    """Same names and order as `like`, each tensor of `like`'s dtype and shape, values as expected."""
    assert list(model) == list(like)
    for name, t in model.items():
        assert t.dtype == like[name].dtype, name
        assert t.shape == like[name].shape, name
        assert t.device == CPU
        if t.dtype.is_floating_point:
            rtol, atol = TOLERANCES[t.dtype]
            np.testing.assert_allclose(f64(t), expected[name], rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(t.numpy(), expected[name].astype(t.numpy().dtype), err_msg=name)


def updates_and_weights(seed: int, k: int, scale: float = 1.0) -> tuple[list[State], list[float]]:
    """k random updates and random positive weights."""
    gen = torch.Generator().manual_seed(seed)
    updates = [random_state(gen, scale) for _ in range(k)]
    weights = [float(w) for w in torch.randint(1, 50, (k,), generator=gen)]
    return updates, weights


# --- registry ---------------------------------------------------------------------------------


def test_registry_has_the_robust_methods() -> None:
    """METHODS maps each robust name to its class, which holds updates; coordinate ones are shardable."""
    expected = {
        AggregationMethod.MEDIAN: (Median, True),
        AggregationMethod.TRIMMED_MEAN: (TrimmedMean, True),
        AggregationMethod.KRUM: (Krum, False),
        AggregationMethod.MULTI_KRUM: (MultiKrum, False),
        AggregationMethod.BULYAN: (Bulyan, False),
        AggregationMethod.ENSEMBLE: (Ensemble, False),
    }
    for name, (cls, shardable) in expected.items():
        assert METHODS[name] is cls
        assert cls.holds_updates is True
        assert cls.shardable is shardable


# --- sorting networks and chunks --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10, 16, 17, 33, 100])
def test_sorting_network_sorts(n: int) -> None:
    """The full network sorts random rows (ties included) exactly as numpy does."""
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(-5, 5, (n, 257), generator=gen).to(torch.float32)
    values[:, :128] = torch.randn(n, 128, generator=gen)
    rows = [v.clone() for v in values]
    ordered, _ = sort_rows(rows, torch.empty(257), tuple(range(n)))
    np.testing.assert_array_equal(torch.stack(ordered).numpy(), np.sort(values.numpy(), axis=0))


def test_pruned_network_is_smaller_and_still_exact_at_the_median() -> None:
    """Pruning to the median keeps fewer comparators and gives the same middle rows."""
    full = sorting_network(100, tuple(range(100)))
    pruned = sorting_network(100, (49, 50))
    assert len(pruned) < len(full)
    values = torch.randn(100, 64, generator=torch.Generator().manual_seed(1))
    ordered, _ = sort_rows([v.clone() for v in values], torch.empty(64), (49, 50))
    expected = np.sort(values.numpy(), axis=0)
    np.testing.assert_array_equal(ordered[49].numpy(), expected[49])
    np.testing.assert_array_equal(ordered[50].numpy(), expected[50])


def test_plan_chunks_covers_every_element_once_across_tensors() -> None:
    """Chunks of a fixed length span tensor boundaries and cover each tensor's range in order."""
    sizes = [("a", 5), ("b", 1), ("c", 12), ("d", 0), ("e", 3)]
    chunks = list(plan_chunks(sizes, 4))
    assert [size for _, size in chunks] == [4, 4, 4, 4, 4, 1]
    seen: dict[str, list[int]] = {}
    for pieces, size in chunks:
        offsets = [offset for _, _, _, offset in pieces]
        assert offsets[0] == 0
        assert sum(stop - start for _, start, stop, _ in pieces) == size
        for name, start, stop, _ in pieces:
            seen.setdefault(name, []).extend(range(start, stop))
    assert seen == {"a": list(range(5)), "b": [0], "c": list(range(12)), "e": list(range(3))}


# --- median and trimmed mean ------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 10, 11])
def test_median_matches_numpy(k: int) -> None:
    """Coordinate-wise median (even count: mean of the two middle values) against numpy."""
    updates, weights = updates_and_weights(k, k)
    out = run(Median, MedianParams(), updates, weights)
    expected = ref_coordinatewise(updates, weights, lambda v: np.median(v, axis=0))
    assert_matches(out.model, expected, updates[0])
    assert out.record == {"n": k}


@pytest.mark.parametrize(("k", "beta"), [(1, 0.3), (4, 0.0), (10, 0.1), (10, 0.3), (11, 0.25), (7, 0.49)])
def test_trimmed_mean_matches_numpy(k: int, beta: float) -> None:
    """Trimmed mean cutting floor(beta K) per end against numpy."""
    updates, weights = updates_and_weights(100 + k, k)
    out = run(TrimmedMean, TrimmedMeanParams(beta=beta), updates, weights)
    expected = ref_coordinatewise(updates, weights, lambda v: ref_trimmed(v, beta))
    assert_matches(out.model, expected, updates[0])
    assert out.record == {"n": k, "trimmed_per_end": int(Fraction(repr(beta)) * k)}


def test_trimmed_mean_reads_beta_as_its_decimal() -> None:
    """beta = 0.29 with 100 updates cuts 29 per end (0.29 * 100 is 28.999... in binary)."""
    gen = torch.Generator().manual_seed(3)
    updates = [{"x": torch.randn(4, generator=gen)} for _ in range(100)]
    out = run(TrimmedMean, TrimmedMeanParams(beta=0.29), updates, [1.0] * 100)
    assert out.record["trimmed_per_end"] == 29
    values = stack(updates, "x")
    expected = np.sort(values, axis=0)[29:71].mean(axis=0)
    np.testing.assert_allclose(f64(out.model["x"]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("network_max_rows", [4096, 64])
@pytest.mark.parametrize("cls", [Median, TrimmedMean])
def test_coordinatewise_many_updates(cls: type[Method], network_max_rows: int, monkeypatch) -> None:
    """300 updates match numpy, through the sorting network and through the torch.sort fallback."""
    monkeypatch.setattr(coordinate, "_NETWORK_MAX_ROWS", network_max_rows)
    gen = torch.Generator().manual_seed(5)
    updates = [{"x": torch.randn(33, generator=gen)} for _ in range(300)]
    params: MethodParams = MedianParams() if cls is Median else TrimmedMeanParams(beta=0.2)
    out = run(cls, params, updates, [1.0] * 300)
    values = stack(updates, "x")
    expected = np.median(values, axis=0) if cls is Median else ref_trimmed(values, 0.2)
    # 180 float32 values summed: about 1e-7 absolute error on values of order 1.
    np.testing.assert_allclose(f64(out.model["x"]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [Median, TrimmedMean])
def test_coordinatewise_over_several_chunks(cls: type[Method]) -> None:
    """A model larger than one chunk (pieces spanning tensors) matches numpy everywhere."""
    gen = torch.Generator().manual_seed(6)
    spec = {"a": (3,), "big": (300_001,), "b": (17,), "d": (5, 7)}
    updates = [{n: torch.randn(s, generator=gen) for n, s in spec.items()} for _ in range(5)]
    params: MethodParams = MedianParams() if cls is Median else TrimmedMeanParams(beta=0.2)
    out = run(cls, params, updates, [1.0] * 5)
    for name in spec:
        values = stack(updates, name)
        expected = np.median(values, axis=0) if cls is Median else ref_trimmed(values, 0.2)
        np.testing.assert_allclose(f64(out.model[name]), expected, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(("cls", "params"), [(Median, MedianParams()), (TrimmedMean, TrimmedMeanParams())])
def test_coordinatewise_shards_equal_the_full_result(cls: type[Method], params: MethodParams) -> None:
    """A method over a subset of the tensors gives exactly those tensors of the full result."""
    updates, weights = updates_and_weights(7, 9)
    full = run(cls, params, updates, weights).model
    for subset in (["conv.weight"], ["fc.bias", "mask"], ["emb", "fc.weight", "bn.num_batches_tracked"]):
        part = run(cls, params, [{n: u[n] for n in subset} for u in updates], weights).model
        assert list(part) == subset
        for name in subset:
            assert torch.equal(part[name], full[name]), name


@pytest.mark.parametrize(("cls", "params"), [(Median, MedianParams()), (TrimmedMean, TrimmedMeanParams())])
def test_coordinatewise_leaves_zero_weight_updates_out(cls: type[Method], params: MethodParams) -> None:
    """An update of weight 0 (here with wild values) takes no part."""
    updates, weights = updates_and_weights(8, 6)
    wild = {n: (t * 1000 if t.dtype.is_floating_point else t) for n, t in updates[2].items()}
    with_zero = [*updates[:2], wild, *updates[2:]]
    out = run(cls, params, with_zero, [*weights[:2], 0.0, *weights[2:]]).model
    expected = run(cls, params, updates, weights).model
    for name in expected:
        assert torch.equal(out[name], expected[name]), name


@pytest.mark.parametrize(("cls", "params"), [(Median, MedianParams()), (TrimmedMean, TrimmedMeanParams())])
def test_coordinatewise_identical_updates_give_that_update(cls: type[Method], params: MethodParams) -> None:
    """Identical updates come out bit for bit, every dtype."""
    (update,), _ = updates_and_weights(9, 1)
    out = run(cls, params, [update] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).model
    for name, t in update.items():
        assert out[name].dtype == t.dtype
        assert torch.equal(out[name], t), name


def test_integer_and_bool_rule_rounds_half_to_even() -> None:
    """Integers: weighted mean rounded half to even; bool: True at a weighted share of exactly 0.5."""
    updates = [
        {"n": torch.tensor([1, 2, 2, 0]), "m": torch.tensor([True, True, False])},
        {"n": torch.tensor([2, 3, 3, 7]), "m": torch.tensor([False, True, False])},
    ]
    cases: list[tuple[type[Method], MethodParams]] = [
        (Median, MedianParams()),
        (TrimmedMean, TrimmedMeanParams()),
    ]
    for cls, params in cases:
        out = run(cls, params, updates, [1.0, 1.0]).model
        assert out["n"].dtype == torch.int64
        assert out["n"].tolist() == [2, 2, 2, 4]  # 1.5 -> 2, 2.5 -> 2, 3.5 -> 4
        assert out["m"].tolist() == [True, True, False]
    weighted = run(Median, MedianParams(), updates, [3.0, 1.0]).model
    assert weighted["n"].tolist() == [1, 2, 2, 2]  # (3 + 2) / 4 = 1.25, 9/4, 9/4, 7/4 = 1.75


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_coordinatewise_keep_each_dtype(dtype: torch.dtype) -> None:
    """A single-dtype model keeps its dtype; floats match numpy after one rounding."""
    gen = torch.Generator().manual_seed(10)
    raw = [torch.randn(50, generator=gen) * 10 for _ in range(6)]
    updates = [{"x": (r > 0) if dtype == torch.bool else r.to(dtype)} for r in raw]
    reducers: list[tuple[type[Method], Callable[[np.ndarray], np.ndarray]]] = [
        (Median, lambda v: np.asarray(np.median(v, axis=0))),
        (TrimmedMean, lambda v: ref_trimmed(v, 0.1)),
    ]
    for cls, reduce in reducers:
        params: MethodParams = MedianParams() if cls is Median else TrimmedMeanParams()
        out = run(cls, params, updates, [1.0] * 6).model
        assert out["x"].dtype == dtype
        expected = ref_coordinatewise(updates, [1.0] * 6, reduce)
        assert_matches(out, expected, updates[0])


# --- Krum, Multi-Krum, Bulyan -----------------------------------------------------------------


def test_distances_are_precise_under_a_large_common_offset() -> None:
    """Updates 1e4 away from 0 and 1e-3 apart: the float64 distances match the direct differences."""
    gen = torch.Generator().manual_seed(11)
    offset = torch.randn(10_000, generator=gen, dtype=torch.float64) * 1e4
    noise = [torch.randn(10_000, generator=gen, dtype=torch.float64) * 1e-3 for _ in range(5)]
    updates = [{"x": offset + n} for n in noise]
    got = pairwise_sq_distances(updates, ["x"], CPU).numpy()
    np.testing.assert_allclose(got, ref_distances(updates), rtol=1e-9)
    assert np.all(np.diag(got) == 0)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (9, 3), (12, 2), (3, 0)])
def test_krum_matches_reference(n: int, f: int) -> None:
    """Krum picks the reference's update (n = 2f + 3 is f's maximum); scores and selection recorded."""
    updates, weights = updates_and_weights(20 + n, n)
    updates[1] = {k: (v * 50 if v.dtype.is_floating_point else v) for k, v in updates[1].items()}
    out = run(Krum, KrumParams(f=f), updates, weights)
    scores = ref_scores(ref_distances(updates), list(range(n)), f)
    best = ref_best(scores)
    assert best != 1
    assert out.record["selected"] == [best]
    assert out.record["n"] == n and out.record["f"] == f
    np.testing.assert_allclose(out.record["scores"], [scores[i] for i in range(n)], rtol=1e-9)
    for name, t in updates[best].items():
        assert torch.equal(out.model[name], t), name
        assert out.model[name].data_ptr() != t.data_ptr(), "the model is a copy"


@pytest.mark.parametrize(("n", "f", "m"), [(7, 2, None), (10, 1, 3), (5, 1, 5)])
def test_multi_krum_matches_reference(n: int, f: int, m: int | None) -> None:
    """Multi-Krum: the weighted mean of the m (default n - f) lowest scores."""
    updates, weights = updates_and_weights(40 + n, n)
    updates[0] = {k: (v + 30 if v.dtype.is_floating_point else v) for k, v in updates[0].items()}
    out = run(MultiKrum, MultiKrumParams(f=f, m=m), updates, weights)
    scores = ref_scores(ref_distances(updates), list(range(n)), f)
    keep = m if m is not None else n - f
    chosen = sorted(sorted(scores, key=lambda i: (scores[i], i))[:keep])
    assert out.record["selected"] == chosen
    assert out.record["m"] == keep
    expected = ref_weighted_mean([updates[i] for i in chosen], [weights[i] for i in chosen])
    assert_matches(out.model, expected, updates[0])


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2), (12, 1), (3, 0)])
def test_bulyan_matches_reference(n: int, f: int) -> None:
    """Bulyan: iterated Krum then the mean of the values nearest the median (n = 4f + 3 at the limit)."""
    updates, weights = updates_and_weights(60 + n, n)
    for i in range(f):
        updates[i] = {k: (v * -20 if v.dtype.is_floating_point else v) for k, v in updates[i].items()}
    out = run(Bulyan, BulyanParams(f=f), updates, weights)
    expected, chosen = ref_bulyan(updates, weights, f)
    assert out.record["selected"] == chosen
    assert (out.record["theta"], out.record["beta"]) == (n - 2 * f, n - 4 * f)
    assert_matches(out.model, expected, updates[0])


def test_bulyan_ties_of_distance_go_to_the_smaller_value() -> None:
    """Values -1, 0, 0, 0, 1 around median 0 with one to drop per side... and a tie at distance 1."""
    values = [[-1.0], [0.0], [0.0], [1.0], [5.0], [-5.0], [0.5]]
    updates = [{"x": torch.tensor(v, dtype=torch.float64)} for v in values]
    out = run(Bulyan, BulyanParams(f=1), updates, [1.0] * 7)
    chosen = out.record["selected"]
    expected, ref_chosen = ref_bulyan(updates, [1.0] * 7, 1)
    assert chosen == ref_chosen
    np.testing.assert_allclose(f64(out.model["x"]), expected["x"], rtol=1e-12)


@pytest.mark.parametrize(
    ("cls", "params", "n", "message"),
    [
        (Krum, KrumParams(f=2), 6, "more than 2f + 2 = 6"),
        (MultiKrum, MultiKrumParams(f=1), 4, "more than 2f + 2 = 4"),
        (MultiKrum, MultiKrumParams(f=1, m=6), 5, "at least m = 6"),
        (Bulyan, BulyanParams(f=1), 6, "at least 4f + 3 = 7"),
        (Krum, KrumParams(f=0), 1, "more than 2f + 2 = 2"),
    ],
)
def test_too_few_updates(cls: type[Method], params: MethodParams, n: int, message: str) -> None:
    """n below a method's minimum raises TooFewUpdates naming the rule and the count."""
    updates, weights = updates_and_weights(80, n)
    with pytest.raises(TooFewUpdates, match=re.escape(message)) as info:
        run(cls, params, updates, weights)
    assert f"the round has {n}" in info.value.detail


def test_zero_weight_updates_take_no_part_in_selection() -> None:
    """A zero-weight update does not count in n; indices refer to the order of add; its score is None."""
    updates, weights = updates_and_weights(90, 6)
    weights[2] = 0.0
    out = run(Krum, KrumParams(f=1), updates, weights)
    rest = [u for i, u in enumerate(updates) if i != 2]
    scores = ref_scores(ref_distances(rest), list(range(5)), 1)
    best = ref_best(scores)
    assert out.record["n"] == 5
    assert out.record["scores"][2] is None
    assert out.record["selected"] == [best if best < 2 else best + 1]
    with pytest.raises(TooFewUpdates):
        run(Krum, KrumParams(f=1), updates[:5], [1.0, 1.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize(
    ("cls", "params"),
    [(Krum, KrumParams(f=1)), (MultiKrum, MultiKrumParams(f=1)), (Bulyan, BulyanParams(f=1))],
)
def test_selection_of_identical_updates(cls: type[Method], params: MethodParams) -> None:
    """Identical updates: distances 0, the first one selected on ties, the update comes out exactly."""
    (update,), _ = updates_and_weights(95, 1)
    out = run(cls, params, [update] * 7, [1.0] * 7)
    assert out.record["scores"] == [0.0] * 7
    assert out.record["selected"][0] == 0
    for name, t in update.items():
        assert torch.equal(out.model[name], t), name


# --- ensemble ---------------------------------------------------------------------------------


def test_ensemble_keeps_every_member_and_averages() -> None:
    """Members are CPU copies of every update in add order (zero weight included); model: FedAvg."""
    updates, weights = updates_and_weights(100, 4)
    weights[1] = 0.0
    method = Ensemble(ctx_for(zeros_like(updates[0])), EnsembleParams())
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    out = method.result()
    assert len(out.members) == 4
    assert out.record == {"members": 4}
    for member, update in zip(out.members, updates, strict=True):
        assert list(member) == list(update)
        for name, t in update.items():
            assert torch.equal(member[name], t)
            assert member[name].data_ptr() != t.data_ptr(), "members are copies"
    kept = [i for i in range(4) if weights[i] > 0]
    expected = ref_weighted_mean([updates[i] for i in kept], [weights[i] for i in kept])
    assert_matches(out.model, expected, updates[0])


def test_ensemble_of_one() -> None:
    """One client: one member, and the model is that client's."""
    (update,), _ = updates_and_weights(101, 1)
    out = run(Ensemble, EnsembleParams(), [update], [3.0])
    assert len(out.members) == 1
    for name, t in update.items():
        assert torch.equal(out.model[name], t)


# --- the contract's errors --------------------------------------------------------------------

ALL = [
    (Median, MedianParams()),
    (TrimmedMean, TrimmedMeanParams()),
    (Krum, KrumParams(f=0)),
    (MultiKrum, MultiKrumParams(f=0)),
    (Bulyan, BulyanParams(f=0)),
    (Ensemble, EnsembleParams()),
]


@pytest.mark.parametrize(("cls", "params"), ALL)
def test_refusals(cls: type[Method], params: MethodParams) -> None:
    """Bad weights and mismatched updates are refused; nothing added or only zero weight: nothing to do."""
    (update,), _ = updates_and_weights(110, 1)
    method = cls(ctx_for(zeros_like(update)), params)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidWeight):
            method.add(update, bad)
    extra = {**update, "other": torch.zeros(2)}
    missing = {n: t for n, t in update.items() if n != "mask"}
    wrong_dtype = {**update, "conv.weight": update["conv.weight"].double()}
    wrong_shape = {**update, "conv.weight": update["conv.weight"].reshape(-1)}
    for bad_update, what in [
        (extra, "not in the base model: other"),
        (missing, "missing: mask"),
        (wrong_dtype, "dtype torch.float64"),
        (wrong_shape, "shape"),
    ]:
        with pytest.raises(UpdateMismatch, match=what):
            method.add(bad_update, 1.0)
    with pytest.raises(NothingToAggregate, match="no update was added"):
        method.result()
    with pytest.raises(RuntimeError, match="already taken"):
        method.result()

    zero = cls(ctx_for(zeros_like(update)), params)
    zero.add(update, 0.0)
    with pytest.raises(NothingToAggregate, match="total weight of 0"):
        zero.result()


@pytest.mark.parametrize(("cls", "params"), ALL)
def test_add_after_result_is_refused(cls: type[Method], params: MethodParams) -> None:
    """A method is used for one round: add after result raises."""
    updates, weights = updates_and_weights(120, 3)
    method = cls(ctx_for(zeros_like(updates[0])), params)
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    method.result()
    with pytest.raises(RuntimeError):
        method.add(updates[0], 1.0)


def test_wrong_params_type_is_refused() -> None:
    """A method refuses another method's parameters."""
    with pytest.raises(TypeError, match="takes KrumParams"):
        Krum(ctx_for({"x": torch.zeros(1)}), MedianParams())


@pytest.mark.parametrize("n", [3, 7, 12])
def test_distances_are_exactly_symmetric(n: int) -> None:
    """d(a, b) == d(b, a) bit for bit, so iterated Krum's final exact ties stay ties (lower position wins)."""
    updates, _ = updates_and_weights(90 + n, n)
    names = [name for name, t in updates[0].items() if t.dtype.is_floating_point]
    dist = pairwise_sq_distances(updates, names, torch.device("cpu"))
    assert torch.equal(dist, dist.T)
    assert torch.all(dist.diagonal() == 0)
