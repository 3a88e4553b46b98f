"""The linear family (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, DP-FedAvg, SWAG).

Each method is checked against a plain float64 numpy reference written here, on random inputs and
on edge cases; merging partials of disjoint batches is checked against one instance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from services.aggregator.methods import (
    METHODS,
    Aggregate,
    DPFedAvg,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    InvalidWeight,
    LinearMethod,
    NothingToAggregate,
    Partial,
    RoundContext,
    Swag,
    UpdateMismatch,
    linear,
)
from shared.aggregation import (
    PARAMS,
    AggregationMethod,
    DPFedAvgParams,
    FedAdagradParams,
    FedAdamParams,
    FedAvgMParams,
    FedAvgParams,
    FedProxParams,
    MethodParams,
    SwagParams,
)
from shared.errors import MalformedPayload

CPU = torch.device("cpu")

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2**-10, 2**-12),
    torch.bfloat16: (2**-7, 2**-10),
}
"""(rtol, atol) per dtype against the float64 reference: float32 arithmetic plus one final rounding."""

# Non-default parameters, so that a parameter ignored by a method would show.
CASES: dict[type[LinearMethod], MethodParams] = {
    FedAvg: FedAvgParams(),
    FedProx: FedProxParams(mu=0.3),
    FedAvgM: FedAvgMParams(server_lr=0.7, momentum=0.8),
    FedAdam: FedAdamParams(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-3),
    FedYogi: FedAdamParams(server_lr=0.05, beta1=0.8, beta2=0.95, tau=1e-3),
    FedAdagrad: FedAdagradParams(server_lr=0.05, tau=1e-3),
    DPFedAvg: DPFedAvgParams(clip_norm=4.0, noise_multiplier=0.5),
    Swag: SwagParams(second_moment_suffix=".sq"),
}

Arrays = dict[str, np.ndarray]
Record = dict[str, Any]


def random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict with every kind of tensor, and a SWAG pair (`fc.bias`, `fc.bias.sq`)."""
    bias = torch.randn(8, generator=gen)
    return {
        "fc.weight": torch.randn(8, 5, generator=gen),
        "fc.bias": bias,
        "fc.bias.sq": bias * bias + torch.rand(8, generator=gen) - 0.3,
        "head.double": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "head.half": torch.randn(6, generator=gen).to(torch.float16),
        "head.bf16": torch.randn(4, 3, generator=gen).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64),
        "mask": torch.randint(0, 2, (9,), generator=gen).to(torch.bool),
    }


def f64(tensors: dict[str, torch.Tensor]) -> Arrays:
    """Tensors as float64 numpy arrays."""
    return {name: t.to(torch.float64).numpy() for name, t in tensors.items()}


# References ----------------------------------------------------------------------------------------


def ref_mean(base, updates, weights) -> Arrays:
    """sum_k n_k w_k / sum_k n_k per tensor over the positive-weight updates (unrounded)."""
    kept = [(f64(u), w) for u, w in zip(updates, weights, strict=True) if w > 0]
    total = sum(w for _, w in kept)
    return {name: sum(w * u[name] for u, w in kept) / total for name in base}


def ref_fedavg(params, base, updates, weights, state, seed) -> tuple[Arrays, Arrays, Record]:
    """FedAvg and FedProx."""
    return ref_mean(base, updates, weights), {}, {}


def ref_fedopt(params, base, updates, weights, state, seed) -> tuple[Arrays, Arrays, Record]:
    """FedAvgM / FedAdam / FedYogi / FedAdagrad per Reddi et al. Algorithm 2 (m0 = 0, v0 = tau^2)."""
    mean = ref_mean(base, updates, weights)
    kind = params["kind"]
    out, new_state = dict(mean), {}
    for name, x in f64(base).items():
        if not base[name].dtype.is_floating_point:
            continue
        d = mean[name] - x
        m = state.get(f"m/{name}", np.zeros_like(x))
        if kind == "avgm":
            m = params["momentum"] * m + d
            new_state[f"m/{name}"] = m
            out[name] = x + params["lr"] * m
            continue
        v = state.get(f"v/{name}", np.full_like(x, params["tau"] ** 2))
        if kind == "adam":
            m = params["beta1"] * m + (1 - params["beta1"]) * d
            v = params["beta2"] * v + (1 - params["beta2"]) * d * d
        elif kind == "yogi":
            m = params["beta1"] * m + (1 - params["beta1"]) * d
            v = v - (1 - params["beta2"]) * d * d * np.sign(v - d * d)
        else:
            m = d
            v = v + d * d
        if kind != "adagrad":
            new_state[f"m/{name}"] = m
        new_state[f"v/{name}"] = v
        out[name] = x + params["lr"] * m / (np.sqrt(v) + params["tau"])
    return out, new_state, {}


def ref_dp(params, base, updates, weights, state, seed) -> tuple[Arrays, Arrays, Record]:
    """Unweighted mean of globally L2-clipped deltas, plus std z S / n noise from torch's CPU generator."""
    clip, z = params["clip_norm"], params["noise_multiplier"]
    kept = [f64(u) for u, w in zip(updates, weights, strict=True) if w > 0]
    x = f64(base)
    floating = [name for name in base if base[name].dtype.is_floating_point]
    n = len(kept)
    out: Arrays = {name: np.asarray(sum(u[name] for u in kept) / n) for name in base}
    clipped = 0
    sums = {name: np.zeros_like(x[name]) for name in floating}
    for u in kept:
        norm = np.sqrt(sum(np.sum((u[name] - x[name]) ** 2) for name in floating))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped += norm > clip
        for name in floating:
            sums[name] += scale * (u[name] - x[name])
    std = z * clip / n
    gen = torch.Generator().manual_seed(seed)
    for name in floating:
        dtype = torch.float64 if base[name].dtype == torch.float64 else torch.float32
        noise = torch.randn(base[name].shape, generator=gen, dtype=dtype).numpy().astype(np.float64)
        out[name] = x[name] + sums[name] / n + (std * noise if std > 0 else 0.0)
    record = {
        "clip_norm": clip,
        "noise_multiplier": z,
        "noise_std": std,
        "num_updates": n,
        "num_clipped": clipped,
    }
    return out, {}, record


def ref_swag(params, base, updates, weights, state, seed) -> tuple[Arrays, Arrays, Record]:
    """FedAvg, then second moment = max(second, first**2) with first rounded to its dtype."""
    out = ref_mean(base, updates, weights)
    pairs = clamped = 0
    for name in base:
        second = name + params["suffix"]
        if second in base and base[name].dtype.is_floating_point and base[second].dtype.is_floating_point:
            pairs += 1
            first = torch.from_numpy(out[name]).to(base[name].dtype).to(torch.float64).numpy()
            clamped += int(np.sum(out[second] < first**2))
            out[second] = np.maximum(out[second], first**2)
    return out, {}, {"num_pairs": pairs, "num_clamped": clamped}


Reference = Callable[..., tuple[Arrays, Arrays, Record]]


def reference_for(cls: type[LinearMethod]) -> tuple[Reference, Record]:
    """The reference function of `cls` and its parameters as a plain dict."""
    p = CASES[cls].model_dump()
    if cls in (FedAvg, FedProx):
        return ref_fedavg, p
    if cls is FedAvgM:
        return ref_fedopt, {"kind": "avgm", "lr": p["server_lr"], "momentum": p["momentum"]}
    if cls in (FedAdam, FedYogi):
        kind = "adam" if cls is FedAdam else "yogi"
        return ref_fedopt, {"kind": kind, "lr": p["server_lr"], **p}
    if cls is FedAdagrad:
        return ref_fedopt, {"kind": "adagrad", "lr": p["server_lr"], "tau": p["tau"]}
    if cls is DPFedAvg:
        return ref_dp, p
    return ref_swag, {"suffix": p["second_moment_suffix"]}


# Running and comparing -----------------------------------------------------------------------------


def build(cls: type[LinearMethod], base, state=None, seed=0, params=None) -> LinearMethod:
    """`cls` over `base` on the CPU with the case's parameters."""
    ctx = RoundContext(base=base, device=CPU, state=state or {}, seed=seed)
    return cls(ctx, params if params is not None else CASES[cls])


def run(cls, base, updates, weights, state=None, seed=0, params=None) -> Aggregate:
    """Add every update to one instance; its result."""
    method = build(cls, base, state, seed, params)
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    return method.result()


def assert_matches(model, expected: Arrays, base, *, mixed_precision: bool = False) -> None:
    """The model has the base's names, order, dtypes and shapes, and the reference's values.

    `mixed_precision`: float64 tensors depend on float32 ones (DP's global clipping norm), so they
    are held to float32's tolerance.
    """
    assert list(model) == list(base)
    for name, tensor in model.items():
        assert tensor.dtype == base[name].dtype, name
        assert tensor.shape == base[name].shape, name
        assert tensor.device.type == "cpu", name
        want = np.asarray(expected[name])
        if tensor.dtype.is_floating_point:
            rtol, atol = TOLERANCES[torch.float32 if mixed_precision else tensor.dtype]
            if mixed_precision and tensor.dtype in (torch.float16, torch.bfloat16):
                rtol, atol = TOLERANCES[tensor.dtype]
            np.testing.assert_allclose(
                tensor.to(torch.float64).numpy(), want, rtol=rtol, atol=atol, err_msg=name
            )
        elif tensor.dtype == torch.bool:
            np.testing.assert_array_equal(tensor.numpy(), want >= 0.5, err_msg=name)
        else:
            np.testing.assert_array_equal(tensor.numpy(), np.round(want), err_msg=name)


def assert_result(cls, result: Aggregate, base, updates, weights, state=None, seed=0) -> Arrays:
    """`result` equals the reference's model, state and record; the reference's float64 state."""
    ref, params = reference_for(cls)
    ref_state_in = {k: v.to(torch.float64).numpy() for k, v in (state or {}).items()}
    model, new_state, record = ref(params, base, updates, weights, ref_state_in, seed)
    assert_matches(result.model, model, base, mixed_precision=cls is DPFedAvg)
    assert sorted(result.state) == sorted(new_state)
    for key, value in result.state.items():
        name = key.partition("/")[2]
        assert value.dtype == (torch.float64 if base[name].dtype == torch.float64 else torch.float32), key
        np.testing.assert_allclose(value.to(torch.float64).numpy(), new_state[key], rtol=1e-5, atol=1e-6)
    assert result.record.keys() == record.keys()
    for key, value in record.items():
        assert result.record[key] == pytest.approx(value), key
    assert result.members == []
    return new_state


ALL = list(CASES)


@pytest.fixture(params=ALL, ids=lambda cls: cls.name.value)
def cls(request):
    """Each linear method class."""
    return request.param


# Every method against its reference ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_float64_reference(cls, seed):
    """Random updates and weights: model, state and record equal the numpy reference."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(5)]
    weights = [float(n) for n in rng.integers(1, 1000, size=5)]
    assert_result(cls, run(cls, base, updates, weights, seed=seed), base, updates, weights, seed=seed)


def test_one_client(cls):
    """One update: the reference's result (FedAvg-like methods give the update back)."""
    gen = torch.Generator().manual_seed(10)
    base, update = random_state(gen), random_state(gen)
    result = run(cls, base, [update], [37.0])
    assert_result(cls, result, base, [update], [37.0])
    if cls in (FedAvg, FedProx):
        for name in update:
            assert torch.equal(result.model[name], update[name]), name


def test_zero_weight_client_has_no_influence(cls):
    """A zero-weight update, even one full of NaN, changes nothing, bit for bit."""
    gen = torch.Generator().manual_seed(11)
    base, a, b = random_state(gen), random_state(gen), random_state(gen)
    poisoned = random_state(gen)
    poisoned["fc.weight"].fill_(float("nan"))
    without = run(cls, base, [a, b], [10.0, 20.0], seed=3)
    with_zero = run(cls, base, [a, poisoned, b], [10.0, 0.0, 20.0], seed=3)
    for name in without.model:
        assert torch.equal(with_zero.model[name], without.model[name]), name
    assert with_zero.record == without.record
    assert_result(cls, with_zero, base, [a, poisoned, b], [10.0, 0.0, 20.0], seed=3)


def test_identical_updates(cls):
    """Several clients sending the same tensors with different weights: the reference's result."""
    gen = torch.Generator().manual_seed(12)
    base, update = random_state(gen), random_state(gen)
    result = run(cls, base, [update] * 3, [3.0, 500.0, 71.0])
    assert_result(cls, result, base, [update] * 3, [3.0, 500.0, 71.0])
    if cls in (FedAvg, FedProx):
        for name in update:
            assert torch.equal(result.model[name], update[name]), name


@pytest.mark.parametrize("window", [2, 4, 7])
def test_windows_give_one_add_per_update_bit_for_bit(cls, window, monkeypatch):
    """add_many over windows (blockwise on the CPU, one by one with a transform) gives the result
    of one add per update exactly: model, state and record, a zero-weight NaN update included."""
    monkeypatch.setattr(linear, "FOLD_BLOCK", 16)
    monkeypatch.setattr(linear, "CONVERT_BLOCK", 16)
    gen = torch.Generator().manual_seed(14)
    base = random_state(gen)
    state_tensors = run(cls, base, [near(base, gen)], [5.0]).state  # server optimisers: a second round
    updates = [near(base, gen) for _ in range(7)]
    updates[3]["fc.weight"].fill_(float("nan"))
    weights = [float(w) for w in torch.randint(1, 300, (7,), generator=gen)]
    weights[3] = 0.0
    one_by_one = run(cls, base, updates, weights, state=state_tensors, seed=5)
    method = build(cls, base, state_tensors, seed=5)
    assert method.folds_windows == (cls is not DPFedAvg)
    for start in range(0, 7, window):
        method.add_many(updates[start : start + window], weights[start : start + window])
    windowed = method.result()
    for name, tensor in one_by_one.model.items():
        assert torch.equal(windowed.model[name], tensor), name
    assert windowed.state.keys() == one_by_one.state.keys()
    for key, tensor in one_by_one.state.items():
        assert torch.equal(windowed.state[key], tensor), key
    assert windowed.record == one_by_one.record


def test_dtypes_are_kept(cls):
    """bfloat16, float16, int64 and bool tensors come back in their dtype, inputs untouched."""
    gen = torch.Generator().manual_seed(13)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(3)]
    before = [{n: t.clone() for n, t in u.items()} for u in [base, *updates]]
    result = run(cls, base, updates, [1.0, 2.0, 3.0])
    for name in ("head.bf16", "head.half", "bn.num_batches_tracked", "mask"):
        assert result.model[name].dtype == base[name].dtype, name
    for original, copy in zip([base, *updates], before, strict=True):
        for name in original:
            assert torch.equal(original[name], copy[name]), name


def test_no_update_raises_nothing_to_aggregate(cls):
    """result() before any add() is refused by name."""
    with pytest.raises(NothingToAggregate, match="no update"):
        build(cls, {"w": torch.zeros(2)}).result()


def test_only_zero_weights_raise_nothing_to_aggregate(cls):
    """Only zero-weight updates leave no mean to take."""
    method = build(cls, {"w": torch.zeros(2)})
    method.add({"w": torch.ones(2)}, 0.0)
    with pytest.raises(NothingToAggregate, match="total weight of 0"):
        method.result()


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_invalid_weight_is_refused(cls, weight):
    """Negative or non-finite weights raise InvalidWeight and count nothing."""
    method = build(cls, {"w": torch.zeros(2)})
    with pytest.raises(InvalidWeight):
        method.add({"w": torch.ones(2)}, weight)
    assert method.num_added == 0


def test_mismatching_update_is_refused(cls):
    """A tensor unknown to the base, or of another shape or dtype, raises UpdateMismatch naming it."""
    method = build(cls, {"w": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(UpdateMismatch, match="'x'"):
        method.add({"w": torch.ones(2), "b": torch.ones(1), "x": torch.ones(1)}, 1.0)
    with pytest.raises(UpdateMismatch, match="'w'"):
        method.add({"w": torch.ones(3), "b": torch.ones(1)}, 1.0)
    with pytest.raises(UpdateMismatch, match="'b'"):
        method.add({"w": torch.ones(2), "b": torch.ones(1, dtype=torch.float64)}, 1.0)
    assert method.num_added == 0


def test_result_and_partial_end_the_instance(cls):
    """After result() or partial(), every further call raises RuntimeError."""
    for end in ("result", "partial"):
        method = build(cls, {"w": torch.zeros(2)})
        method.add({"w": torch.ones(2)}, 1.0)
        getattr(method, end)()
        for call in (lambda m=method: m.add({"w": torch.ones(2)}, 1.0), method.result, method.partial):
            with pytest.raises(RuntimeError):
                call()


def test_registry_holds_every_linear_method():
    """METHODS maps each linear method's name to its class, with the contract's parameter model."""
    for cls in ALL:
        assert METHODS[cls.name] is cls
        assert cls.params_type is PARAMS[cls.name]
        assert not cls.holds_updates
        assert isinstance(CASES[cls], cls.params_type)
    expected = {
        AggregationMethod.FEDAVG,
        AggregationMethod.FEDPROX,
        AggregationMethod.FEDAVGM,
        AggregationMethod.FEDADAM,
        AggregationMethod.FEDYOGI,
        AggregationMethod.FEDADAGRAD,
        AggregationMethod.DP_FEDAVG,
        AggregationMethod.SWAG,
    }
    assert {cls.name for cls in ALL} == expected


# Merging partials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(2, 5), (1, 1), (0, 6), (3, 4)], ids=str)
def test_merged_partials_equal_one_instance(cls, split):
    """Partials of disjoint batches, through tensors and back, merge to one instance's result."""
    gen = torch.Generator().manual_seed(20)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(6)]
    updates[3] = {name: t.clone() for name, t in base.items()}  # a zero delta, which DP does not clip
    weights = [5.0, 0.0, 12.0, 1.0, 300.0, 7.0]
    state = {}
    if cls in (FedAdam, FedYogi, FedAvgM):
        state = {f"m/{n}": torch.randn(8, 5, generator=gen) for n in ("fc.weight",)}
    one = run(cls, base, updates, weights, state=state, seed=9)

    a, b = split
    batches = [(updates[:a], weights[:a]), (updates[a:b], weights[a:b]), (updates[b:], weights[b:])]
    merged = build(cls, base, state=state, seed=9)
    for batch, batch_weights in batches:
        pod = build(cls, base, state=state, seed=9)
        for update, weight in zip(batch, batch_weights, strict=True):
            pod.add(update, weight)
        stored = pod.partial().to_tensors()
        assert all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in stored.values())
        merged.merge(Partial.from_tensors(stored))
    assert merged.num_added == 6
    result = merged.result()

    for name, tensor in one.model.items():
        got = result.model[name]
        assert got.dtype == tensor.dtype, name
        if tensor.dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(got, tensor, rtol=1e-6, atol=1e-6, msg=name)
        elif tensor.dtype.is_floating_point:
            # The float32 means agree within 1e-6; a cast to a half type may round them one ulp apart.
            torch.testing.assert_close(got, tensor, rtol=2**-7, atol=2**-10, msg=name)
        else:
            assert torch.equal(got, tensor), name
    assert result.state.keys() == one.state.keys()
    for key, value in one.state.items():
        torch.testing.assert_close(result.state[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert result.record.keys() == one.record.keys()
    for key, value in one.record.items():
        assert result.record[key] == pytest.approx(value), key


def test_partial_round_trips_through_tensors_exactly():
    """to_tensors / from_tensors keep accumulators, weights, counts and the method bit for bit."""
    gen = torch.Generator().manual_seed(21)
    base = random_state(gen)
    method = build(DPFedAvg, base, params=DPFedAvgParams(clip_norm=0.1, noise_multiplier=1.0))
    for weight in (3.0, 0.0, 1.5):
        method.add(random_state(gen), weight)
    partial = method.partial()
    back = Partial.from_tensors(partial.to_tensors())
    assert back.method is AggregationMethod.DP_FEDAVG
    assert (back.num_added, back.total_weight, back.counts) == (3, 2.0, {"num_clipped": 2})
    assert back.weights == partial.weights
    assert back.accumulators.keys() == partial.accumulators.keys() == base.keys()
    for name, acc in partial.accumulators.items():
        assert torch.equal(back.accumulators[name], acc), name
    assert back.accumulators["head.bf16"].dtype == torch.float32
    assert back.accumulators["mask"].dtype == torch.float64


def test_partial_of_another_method_or_shape_is_refused():
    """Merging another method's partial raises ValueError; a wrong accumulator, UpdateMismatch."""
    base = {"w": torch.zeros(2), "h": torch.zeros(2, dtype=torch.float16)}
    pod = build(FedAvg, base)
    pod.add({"w": torch.ones(2), "h": torch.ones(2, dtype=torch.float16)}, 1.0)
    partial = pod.partial()
    with pytest.raises(ValueError, match="fedavg partial into fedadam"):
        build(FedAdam, base).merge(partial)
    wrong_dtype = Partial(
        method=AggregationMethod.FEDAVG,
        accumulators={"h": torch.ones(2, dtype=torch.float16)},
        weights={"h": 1.0},
        num_added=1,
        total_weight=1.0,
    )
    with pytest.raises(UpdateMismatch, match="'h'"):
        build(FedAvg, base).merge(wrong_dtype)
    wrong_shape = Partial(
        method=AggregationMethod.FEDAVG,
        accumulators={"w": torch.ones(3)},
        weights={"w": 1.0},
        num_added=1,
        total_weight=1.0,
    )
    with pytest.raises(UpdateMismatch, match="'w'"):
        build(FedAvg, base).merge(wrong_shape)


def test_malformed_partial_tensors_are_refused():
    """from_tensors names what is wrong with a blob that is not a partial."""
    with pytest.raises(MalformedPayload, match="not a linear method's partial"):
        Partial.from_tensors({"w": torch.zeros(2)})
    good = Partial(
        method=AggregationMethod.FEDAVG,
        accumulators={"w": torch.ones(2)},
        weights={"w": 1.0},
        num_added=1,
        total_weight=1.0,
    ).to_tensors()
    with pytest.raises(MalformedPayload, match="no weight"):
        Partial.from_tensors({k: v for k, v in good.items() if k != "weight/w"})
    with pytest.raises(MalformedPayload, match="unknown entry"):
        Partial.from_tensors({**good, "junk": torch.zeros(1)})


def test_merging_only_zero_weight_batches_still_has_nothing_to_aggregate():
    """Partials that carry only zero-weight updates count them but leave no mean."""
    base = {"w": torch.zeros(2)}
    merged = build(FedAvg, base)
    for _ in range(2):
        pod = build(FedAvg, base)
        pod.add({"w": torch.ones(2)}, 0.0)
        merged.merge(pod.partial())
    assert merged.num_added == 2
    with pytest.raises(NothingToAggregate, match="the 2 updates added have a total weight of 0"):
        merged.result()


# Server optimisers over rounds -------------------------------------------------------------------------


def near(base: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A client model near `base` (floating tensors moved by 0.1 N(0, 1)); random integers and bools."""
    out = random_state(gen)
    for name, t in base.items():
        if t.dtype.is_floating_point:
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            out[name] = (t.to(torch.float64) + 0.1 * noise).to(t.dtype)
    return out


@pytest.mark.parametrize("opt", [FedAvgM, FedAdam, FedYogi, FedAdagrad], ids=lambda c: c.name.value)
def test_server_optimisers_over_three_rounds_carry_state(opt):
    """Three rounds, each round's base and state the previous round's outcome, against the reference."""
    gen = torch.Generator().manual_seed(30)
    rng = np.random.default_rng(30)
    base = random_state(gen)
    state: dict[str, torch.Tensor] = {}
    for _ in range(3):
        updates = [near(base, gen) for _ in range(4)]
        weights = [float(n) for n in rng.integers(1, 100, size=4)]
        result = run(opt, base, updates, weights, state=state)
        assert_result(opt, result, base, updates, weights, state=state)
        floating = {n for n, t in base.items() if t.dtype.is_floating_point}
        prefixes = {"v"} if opt is FedAdagrad else {"m"} if opt is FedAvgM else {"m", "v"}
        assert set(result.state) == {f"{p}/{n}" for p in prefixes for n in floating}
        assert all(t.device.type == "cpu" for t in result.state.values())
        base, state = result.model, result.state


def test_fedavgm_without_momentum_keeps_no_state():
    """FedAvgM with momentum 0 is FedAvg with a server learning rate, and keeps no state."""
    base = {"w": torch.tensor([1.0, 2.0])}
    result = run(
        FedAvgM,
        base,
        [{"w": torch.tensor([3.0, 0.0])}],
        [1.0],
        params=FedAvgMParams(server_lr=0.5, momentum=0),
    )
    assert result.model["w"].tolist() == [2.0, 1.0]
    assert result.state == {}


def test_server_state_of_another_shape_is_refused():
    """State left by a model of another shape raises UpdateMismatch naming the key."""
    base = {"w": torch.zeros(2)}
    method = build(FedAdam, base, state={"m/w": torch.zeros(3), "v/w": torch.zeros(2)})
    method.add({"w": torch.ones(2)}, 1.0)
    with pytest.raises(UpdateMismatch, match="m/'w'"):
        method.result()


# DP-FedAvg -------------------------------------------------------------------------------------------------


def dp_updates(base: dict[str, torch.Tensor], norms: list[float], gen) -> list[dict[str, torch.Tensor]]:
    """Updates whose delta to `base` (over the floating tensors) has exactly each L2 norm in `norms`."""
    out = []
    for norm in norms:
        deltas = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in base.items()}
        total = torch.stack([torch.sum(d.double() ** 2) for d in deltas.values()]).sum().sqrt()
        out.append({n: base[n] + deltas[n] * (norm / total).to(base[n].dtype) for n in base})
    return out


def test_dp_clips_large_deltas_only_and_ignores_weights():
    """Norms below the clip pass whole, above are scaled to it; weights change nothing; no noise at z=0."""
    gen = torch.Generator().manual_seed(40)
    base = {
        "a": torch.randn(50, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, 4, dtype=torch.float64),
    }
    updates = dp_updates(base, [0.5, 2.4, 2.6, 30.0], gen)
    params = DPFedAvgParams(clip_norm=2.5, noise_multiplier=0.0)
    result = run(DPFedAvg, base, updates, [1.0, 1.0, 1.0, 1.0], params=params)
    assert result.record == {
        "clip_norm": 2.5,
        "noise_multiplier": 0.0,
        "noise_std": 0.0,
        "num_updates": 4,
        "num_clipped": 2,
    }
    scales = [1.0, 1.0, 2.5 / 2.6, 2.5 / 30.0]
    for name in base:
        deltas = [s * (u[name] - base[name]).numpy() for s, u in zip(scales, updates, strict=True)]
        want = base[name].numpy() + sum(deltas) / 4
        np.testing.assert_allclose(result.model[name].numpy(), want, rtol=1e-12, atol=1e-12)
    weighted = run(DPFedAvg, base, updates, [1.0, 50.0, 3.0, 999.0], params=params)
    for name in base:
        assert torch.equal(weighted.model[name], result.model[name]), name


def test_dp_noise_has_the_documented_std():
    """On a large tensor with zero deltas the model minus the base is N(0, (z S / n)^2)."""
    base = {"w": torch.zeros(400, 500)}
    updates = [{"w": torch.zeros(400, 500)} for _ in range(4)]
    params = DPFedAvgParams(clip_norm=1.5, noise_multiplier=2.0)
    result = run(DPFedAvg, base, updates, [1.0, 2.0, 3.0, 4.0], seed=1234, params=params)
    std = 2.0 * 1.5 / 4
    assert result.record["noise_std"] == pytest.approx(std)
    noise = result.model["w"].double()
    # 200,000 samples: the sample std is within 0.5% of std with overwhelming probability.
    assert noise.std().item() == pytest.approx(std, rel=0.01)
    assert abs(noise.mean().item()) < 5 * std / noise.numel() ** 0.5


def test_dp_same_seed_same_model_other_seed_other_model():
    """The noise is a function of the seed alone."""
    gen = torch.Generator().manual_seed(41)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(3)]
    first = run(DPFedAvg, base, updates, [1.0, 2.0, 3.0], seed=77)
    again = run(DPFedAvg, base, updates, [1.0, 2.0, 3.0], seed=77)
    other = run(DPFedAvg, base, updates, [1.0, 2.0, 3.0], seed=78)
    for name in base:
        assert torch.equal(first.model[name], again.model[name]), name
    assert not torch.equal(first.model["fc.weight"], other.model["fc.weight"])


def test_dp_refuses_an_incomplete_update():
    """An update that lacks a tensor would change the sensitivity: UpdateMismatch, nothing counted."""
    method = build(DPFedAvg, {"w": torch.zeros(2), "b": torch.zeros(1)})
    with pytest.raises(UpdateMismatch, match="lacks"):
        method.add({"w": torch.ones(2)}, 1.0)
    assert method.num_added == 0
    assert method.counts == {}


# SWAG --------------------------------------------------------------------------------------------------


def test_swag_clamps_second_moments_below_the_squared_mean():
    """A pair whose averaged second moment falls under mean^2 is raised to it, and counted."""
    base = {"w": torch.zeros(3), "w.sq_mean": torch.zeros(3), "other": torch.zeros(2), "n": torch.tensor(0)}
    a = {
        "w": torch.tensor([1.0, 2.0, -3.0]),
        "w.sq_mean": torch.tensor([0.5, 9.0, 1.0]),
        "other": torch.ones(2),
        "n": torch.tensor(4),
    }
    b = {
        "w": torch.tensor([1.0, 0.0, -1.0]),
        "w.sq_mean": torch.tensor([1.5, 1.0, 0.0]),
        "other": torch.zeros(2),
        "n": torch.tensor(2),
    }
    result = run(Swag, base, [a, b], [1.0, 1.0], params=SwagParams())
    assert result.model["w"].tolist() == [1.0, 1.0, -2.0]
    assert result.model["w.sq_mean"].tolist() == [1.0, 5.0, 4.0]
    assert result.model["other"].tolist() == [0.5, 0.5]
    assert result.model["n"].item() == 3
    assert result.record == {"num_pairs": 1, "num_clamped": 1}


def test_swag_counts_pairs_by_suffix_only_when_both_are_floating_and_alike():
    """Pairs need the suffix, floating dtypes and equal shapes."""
    base = {
        "a": torch.zeros(2),
        "a~2": torch.zeros(2, dtype=torch.float64),
        "b": torch.zeros(2),
        "b~2": torch.zeros(3),
        "c": torch.zeros(2, dtype=torch.int64),
        "c~2": torch.zeros(2),
    }
    update = {name: t + 1 for name, t in base.items()}
    result = run(Swag, base, [update], [1.0], params=SwagParams(second_moment_suffix="~2"))
    assert result.record == {"num_pairs": 1, "num_clamped": 0}
    assert result.model["a~2"].dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(cls):
    """On the GPU each method gives the CPU's result (DP's noise too), on the CPU."""
    gen = torch.Generator().manual_seed(50)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(3)]
    on_cpu = run(cls, base, updates, [1.0, 5.0, 2.0], seed=5)
    method = cls(RoundContext(base=base, device=torch.device("cuda"), seed=5), CASES[cls])
    for update, weight in zip(updates, [1.0, 5.0, 2.0], strict=True):
        method.add(update, weight)
    on_gpu = method.result()
    for name, tensor in on_gpu.model.items():
        assert tensor.device.type == "cpu"
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(tensor, on_cpu.model[name], rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(tensor, on_cpu.model[name]), name
