"""FedAvg against a plain float64 numpy reference, dtype by dtype, and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.aggregator.methods import (
    METHODS,
    FedAvg,
    FedProx,
    InvalidWeight,
    NothingToAggregate,
    RoundContext,
    UpdateMismatch,
    kernels,
    linear,
)
from shared.aggregation import AggregationMethod, FedAvgParams, FedProxParams

CPU = torch.device("cpu")

# Tolerances against the float64 reference: float32 accumulation error for a handful of clients
# plus, for the half types, one rounding to the stored dtype (relative half-ulp 2**-11 and 2**-8).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2**-10, 2**-14),
    torch.bfloat16: (2**-7, 2**-14),
}
"""(rtol, atol) per dtype."""


def random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state dict with every kind of tensor a real model carries."""
    return {
        "fc.weight": torch.randn(8, 5, generator=gen),
        "fc.bias": torch.randn(8, generator=gen),
        "head.double": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "head.half": torch.randn(6, generator=gen).to(torch.float16),
        "head.bf16": torch.randn(4, 3, generator=gen).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.randint(0, 10_000, (), generator=gen, dtype=torch.int64),
        "bn.counts": torch.randint(-500, 500, (5,), generator=gen, dtype=torch.int32),
        "mask": torch.randint(0, 2, (9,), generator=gen).to(torch.bool),
    }


def reference(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, np.ndarray]:
    """sum_k n_k w_k / sum_k n_k in float64 numpy, per tensor, over the clients that sent it."""
    out = {}
    for name in updates[0]:
        pairs = [(u[name].to(torch.float64).numpy(), w) for u, w in zip(updates, weights, strict=True)]
        total = sum(w for _, w in pairs)
        out[name] = np.asarray(sum(w * x for x, w in pairs) / total)
    return out


def fedavg(base, device=CPU) -> FedAvg:
    """A FedAvg over `base` on `device`."""
    return FedAvg(RoundContext(base=base, device=device), FedAvgParams())


def aggregate(base, updates, weights) -> dict[str, torch.Tensor]:
    """Run FedAvg over `updates` with `weights`; the new model."""
    method = fedavg(base)
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    return method.result().model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_float64_reference_for_every_dtype(seed):
    """Each tensor equals the numpy weighted mean within its dtype's tolerance; ints and bools exactly."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(5)]
    weights = [float(n) for n in rng.integers(1, 1000, size=5)]

    result = aggregate(base, updates, weights)
    expected = reference(updates, weights)

    assert list(result) == list(base)
    for name, tensor in result.items():
        assert tensor.dtype == base[name].dtype, name
        assert tensor.shape == base[name].shape, name
        if tensor.dtype.is_floating_point:
            rtol, atol = TOLERANCES[tensor.dtype]
            got = tensor.to(torch.float64).numpy()
            np.testing.assert_allclose(got, expected[name], rtol=rtol, atol=atol, err_msg=name)
        elif tensor.dtype == torch.bool:
            np.testing.assert_array_equal(tensor.numpy(), expected[name] >= 0.5, err_msg=name)
        else:
            np.testing.assert_array_equal(tensor.numpy(), np.round(expected[name]), err_msg=name)


def test_integer_mean_rounds_half_to_even():
    """2.5 -> 2, 3.5 -> 4, -2.5 -> -2, and a weighted 2.75 -> 3, in the tensor's own dtype."""
    base = {"n": torch.zeros(4, dtype=torch.int64), "u": torch.zeros(2, dtype=torch.uint8)}
    a = {"n": torch.tensor([2, 3, -2, 2]), "u": torch.tensor([0, 255], dtype=torch.uint8)}
    b = {"n": torch.tensor([3, 4, -3, 3]), "u": torch.tensor([1, 254], dtype=torch.uint8)}
    equal = aggregate(base, [a, b], [10.0, 10.0])
    assert equal["n"].tolist() == [2, 4, -2, 2]
    assert equal["u"].tolist() == [0, 254]
    assert equal["u"].dtype == torch.uint8
    weighted = aggregate(base, [a, b], [1.0, 3.0])
    assert weighted["n"].tolist() == [3, 4, -3, 3]


def test_bool_is_true_from_a_weighted_half():
    """True where the weighted share of True is >= 0.5: exactly half counts as True."""
    base = {"m": torch.zeros(3, dtype=torch.bool)}
    a = {"m": torch.tensor([True, True, False])}
    b = {"m": torch.tensor([False, True, False])}
    assert aggregate(base, [a, b], [3.0, 3.0])["m"].tolist() == [True, True, False]
    assert aggregate(base, [a, b], [3.0, 4.0])["m"].tolist() == [False, True, False]


def test_one_client_gives_its_tensors_bit_for_bit():
    """With a single update the result is that update, whatever its weight."""
    gen = torch.Generator().manual_seed(3)
    base, update = random_state(gen), random_state(gen)
    result = aggregate(base, [update], [37.0])
    for name in update:
        assert torch.equal(result[name], update[name]), name


def test_identical_updates_give_them_back():
    """Several clients sending the same tensors, with different weights, average to those tensors."""
    gen = torch.Generator().manual_seed(4)
    base, update = random_state(gen), random_state(gen)
    result = aggregate(base, [update, update, update], [3.0, 500.0, 71.0])
    for name in update:
        assert torch.equal(result[name], update[name]), name


def test_zero_weight_client_has_no_influence():
    """A zero-weight update, even one full of NaN, changes nothing."""
    gen = torch.Generator().manual_seed(5)
    base, a, b = random_state(gen), random_state(gen), random_state(gen)
    poisoned = {name: t.clone() for name, t in random_state(gen).items()}
    poisoned["fc.weight"].fill_(float("nan"))
    without = aggregate(base, [a, b], [10.0, 20.0])
    with_zero = aggregate(base, [a, poisoned, b], [10.0, 0.0, 20.0])
    for name in without:
        assert torch.equal(with_zero[name], without[name]), name


def test_all_weights_zero_raises_nothing_to_aggregate():
    """Only zero-weight updates leave no mean to take."""
    gen = torch.Generator().manual_seed(6)
    base = random_state(gen)
    method = fedavg(base)
    method.add(random_state(gen), 0.0)
    method.add(random_state(gen), 0.0)
    with pytest.raises(NothingToAggregate, match="total weight of 0"):
        method.result()


def test_no_update_raises_nothing_to_aggregate():
    """result() before any add() is refused by name."""
    method = fedavg({"w": torch.zeros(2)})
    with pytest.raises(NothingToAggregate, match="no update"):
        method.result()


def test_tensor_missing_from_some_updates_is_averaged_over_its_senders():
    """Weights renormalise per tensor; a tensor nobody sent keeps the base values."""
    base = {"a": torch.zeros(3), "b": torch.full((2,), 7.0), "c": torch.tensor([1.5, -2.0])}
    u1 = {"a": torch.tensor([1.0, 2.0, 3.0]), "c": torch.tensor([3.0, 3.0])}
    u2 = {"a": torch.tensor([4.0, 5.0, 6.0])}
    u3 = {"a": torch.tensor([0.0, 0.0, 0.0]), "c": torch.tensor([6.0, 0.0])}
    result = aggregate(base, [u1, u2, u3], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(result["a"].numpy(), [(1 + 8 + 0) / 6, (2 + 10) / 6, (3 + 12) / 6], rtol=1e-6)
    np.testing.assert_allclose(result["c"].numpy(), [(3 + 18) / 4, 3 / 4], rtol=1e-6)
    assert torch.equal(result["b"], base["b"])
    assert result["b"].data_ptr() != base["b"].data_ptr()


def test_update_that_does_not_fit_the_base_is_refused_whole():
    """Unknown names, other dtypes or shapes raise UpdateMismatch naming the tensor, and add nothing."""
    base = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    method = fedavg(base)
    method.add({"w": torch.ones(2, 2), "b": torch.ones(2)}, 1.0)
    bad_updates = [
        {"w": torch.full((2, 2), 9.0), "extra": torch.zeros(1)},
        {"w": torch.full((2, 2), 9.0), "b": torch.zeros(3)},
        {"w": torch.full((2, 2), 9.0), "b": torch.zeros(2, dtype=torch.float64)},
    ]
    for bad, name in zip(bad_updates, ["extra", "b", "b"], strict=True):
        with pytest.raises(UpdateMismatch, match=repr(name)):
            method.add(bad, 1.0)
    assert method.num_added == 1
    result = method.result().model
    assert torch.equal(result["w"], torch.ones(2, 2))


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_invalid_weight_is_refused(weight):
    """Negative or non-finite weights raise InvalidWeight."""
    method = fedavg({"w": torch.zeros(2)})
    with pytest.raises(InvalidWeight):
        method.add({"w": torch.ones(2)}, weight)


def test_result_is_taken_once_and_leaves_inputs_untouched():
    """result() consumes the accumulator; the base and the updates are never written to."""
    base = {"w": torch.zeros(3), "n": torch.tensor(4)}
    update = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(8)}
    method = fedavg(base)
    method.add(update, 2.0)
    method.add({"w": torch.tensor([3.0, 2.0, 1.0]), "n": torch.tensor(0)}, 2.0)
    result = method.result().model
    assert result["w"].tolist() == [2.0, 2.0, 2.0]
    assert result["n"].item() == 4
    assert base["w"].tolist() == [0.0, 0.0, 0.0]
    assert update["w"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(RuntimeError):
        method.result()
    with pytest.raises(RuntimeError):
        method.add(update, 1.0)


def test_zero_dim_and_empty_tensors():
    """0-d tensors average like any other; empty tensors stay empty."""
    base = {"s": torch.tensor(0.0), "e": torch.zeros(0, 4), "i": torch.zeros(0, dtype=torch.int64)}
    u1 = {"s": torch.tensor(1.0), "e": torch.zeros(0, 4), "i": torch.zeros(0, dtype=torch.int64)}
    u2 = {"s": torch.tensor(4.0), "e": torch.zeros(0, 4), "i": torch.zeros(0, dtype=torch.int64)}
    result = aggregate(base, [u1, u2], [2.0, 1.0])
    assert result["s"].item() == pytest.approx(2.0)
    assert result["e"].shape == (0, 4)
    assert result["i"].shape == (0,)


def test_registry_holds_fedavg_and_fedprox():
    """fedavg is FedAvg and fedprox is FedProx, each with its parameter model."""
    assert METHODS[AggregationMethod.FEDAVG] is FedAvg
    assert METHODS[AggregationMethod.FEDPROX] is FedProx
    assert FedAvg.params_type is FedAvgParams
    assert FedProx.params_type is FedProxParams
    assert not FedAvg.holds_updates


def test_fedprox_is_fedavg_on_the_server():
    """FedProx's server step gives FedAvg's model bit for bit, whatever its mu."""
    gen = torch.Generator().manual_seed(8)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(3)]
    weights = [4.0, 1.0, 9.0]
    prox = FedProx(RoundContext(base=base, device=CPU), FedProxParams(mu=0.5))
    for update, weight in zip(updates, weights, strict=True):
        prox.add(update, weight)
    got = prox.result().model
    want = aggregate(base, updates, weights)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_params_of_another_method_are_refused():
    """A method built with another method's parameter model raises TypeError."""
    with pytest.raises(TypeError, match="FedAvgParams"):
        FedAvg(RoundContext(base={"w": torch.zeros(1)}, device=CPU), FedProxParams())


# Windows: add_many -------------------------------------------------------------------------------


def big_state(gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of odd sizes larger than the (patched) fold block, a small one, a 0-d one, a counter."""
    return {
        "w": torch.randn(7, 1013, generator=gen).to(dtype),
        "v": torch.randn(4099, generator=gen).to(dtype),
        "b": torch.randn(5, generator=gen).to(dtype),
        "s": torch.randn((), generator=gen).to(dtype),
        "e": torch.zeros(0, 3, dtype=dtype),
        "n": torch.randint(0, 100, (3,), generator=gen),
    }


def lerp_reference(updates, weights) -> dict[str, torch.Tensor]:
    """The documented running mean, one whole-tensor lerp_ per update (float32 for the half types),
    over the positive weights; integers as the rounded float64 weighted mean."""
    acc: dict[str, torch.Tensor] = {}
    total: dict[str, float] = {}
    for update, weight in zip(updates, weights, strict=True):
        if weight == 0:
            continue
        for name, t in update.items():
            total[name] = total.get(name, 0.0) + weight
            dtype = torch.float64 if not t.dtype.is_floating_point else linear.accumulation_dtype(t.dtype)
            x = t.to(dtype)
            if name not in acc:
                acc[name] = x.clone() if t.dtype.is_floating_point else x * weight
            elif t.dtype.is_floating_point:
                acc[name].lerp_(x, weight / total[name])
            else:
                acc[name].add_(x, alpha=weight)
    out = {}
    for name, a in acc.items():
        dtype = updates[0][name].dtype
        out[name] = a.to(dtype) if dtype.is_floating_point else a.div_(total[name]).round_().to(dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("window", [1, 3, 4, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_windows_give_the_sequential_lerp_result_bit_for_bit(dtype, window, threads, monkeypatch):
    """Folding windows blockwise (a small block so that every tensor spans several) gives exactly
    the whole-tensor lerp_ of each update in turn, with zero-weight (NaN) updates in the windows,
    with one or two torch threads; and agrees with the float64 reference."""
    monkeypatch.setattr(linear, "FOLD_BLOCK", 1000)
    monkeypatch.setattr(linear, "CONVERT_BLOCK", 1000)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(window * 10 + threads)
        base = big_state(gen, dtype)
        updates = [big_state(gen, dtype) for _ in range(9)]
        weights = [float(w) for w in torch.randint(1, 500, (9,), generator=gen)]
        weights[4] = 0.0
        updates[4]["w"] = torch.full_like(updates[4]["w"], float("nan"))
        method = fedavg(base)
        for start in range(0, 9, window):
            method.add_many(updates[start : start + window], weights[start : start + window])
        assert method.num_added == 9
        got = method.result().model
    finally:
        torch.set_num_threads(previous)
    want = lerp_reference(updates, weights)
    kept = [(u, w) for u, w in zip(updates, weights, strict=True) if w > 0]
    reference_f64 = reference([u for u, _ in kept], [w for _, w in kept])
    rtol, atol = TOLERANCES[dtype]
    for name, tensor in got.items():
        assert tensor.dtype == dtype or name == "n", name
        assert torch.equal(tensor, want[name]), name
        expected = reference_f64[name] if tensor.dtype.is_floating_point else np.round(reference_f64[name])
        np.testing.assert_allclose(tensor.double().numpy(), expected, rtol=rtol, atol=atol, err_msg=name)


def test_windows_at_the_default_block_size_match_single_adds():
    """A tensor several default blocks long, windows of 4 against one add per update: equal."""
    gen = torch.Generator().manual_seed(3)
    n = 2 * linear.FOLD_BLOCK + 17  # several blocks of either kind
    base = {"w": torch.zeros(n, dtype=torch.bfloat16), "f": torch.zeros(n)}
    updates = [
        {"w": torch.randn(n, generator=gen).bfloat16(), "f": torch.randn(n, generator=gen)} for _ in range(6)
    ]
    weights = [3.0, 1.0, 7.0, 2.0, 2.0, 9.0]
    windowed = fedavg(base)
    windowed.add_many(updates[:4], weights[:4])
    windowed.add_many(updates[4:], weights[4:])
    one_by_one = aggregate(base, updates, weights)
    for name, tensor in windowed.result().model.items():
        assert torch.equal(tensor, one_by_one[name]), name


def test_a_window_with_a_tensor_some_updates_lack():
    """Per-tensor weights renormalise inside a window too; a tensor first seen mid-window starts there."""
    base = {"a": torch.zeros(3), "c": torch.tensor([1.5, -2.0])}
    u1 = {"a": torch.tensor([1.0, 2.0, 3.0])}
    u2 = {"a": torch.tensor([4.0, 5.0, 6.0]), "c": torch.tensor([3.0, 3.0])}
    u3 = {"a": torch.tensor([0.0, 0.0, 0.0]), "c": torch.tensor([6.0, 0.0])}
    method = fedavg(base)
    method.add_many([u1, u2, u3], [1.0, 2.0, 3.0])
    result = method.result().model
    np.testing.assert_allclose(result["a"].numpy(), [(1 + 8) / 6, (2 + 10) / 6, (3 + 12) / 6], rtol=1e-6)
    np.testing.assert_allclose(result["c"].numpy(), [(6 + 18) / 5, 6 / 5], rtol=1e-6)


def test_a_window_with_one_bad_update_is_refused_whole():
    """A window holding one mismatching update or one invalid weight raises and folds none of it."""
    base = {"w": torch.zeros(2)}
    method = fedavg(base)
    method.add({"w": torch.ones(2)}, 1.0)
    with pytest.raises(UpdateMismatch, match="'w'"):
        method.add_many([{"w": torch.full((2,), 5.0)}, {"w": torch.zeros(3)}], [1.0, 1.0])
    with pytest.raises(InvalidWeight):
        method.add_many([{"w": torch.full((2,), 5.0)}, {"w": torch.zeros(2)}], [1.0, -1.0])
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        method.add_many([{"w": torch.full((2,), 5.0)}, {"w": torch.zeros(2)}], [1.0])
    assert method.num_added == 1
    assert method.total_weight == 1.0
    assert method.result().model["w"].tolist() == [1.0, 1.0]


def test_check_refuses_what_add_refuses_and_folds_nothing():
    """check() gives the effective weight, raises add's errors, and leaves the method as it was."""
    method = fedavg({"w": torch.zeros(2)})
    assert method.check({"w": torch.ones(2)}, 3) == 3.0
    with pytest.raises(UpdateMismatch):
        method.check({"w": torch.ones(2, dtype=torch.float64)}, 1.0)
    with pytest.raises(InvalidWeight):
        method.check({"w": torch.ones(2)}, float("nan"))
    assert method.num_added == 0
    assert method.folds_windows
    with pytest.raises(NothingToAggregate):
        method.result()


def test_a_half_precision_update_is_converted_a_block_at_a_time(monkeypatch):
    """Without the fused kernel (no numba), folding bfloat16 updates allocates nothing larger than
    one float32 block (no whole-tensor float32 copy), whatever the window; the accumulator itself
    is the only model-sized buffer. (The fused kernel allocates nothing: test_kernels.py.)"""
    monkeypatch.setattr(kernels, "load", lambda: None)
    n = 4 * linear.CONVERT_BLOCK
    gen = torch.Generator().manual_seed(5)
    updates = [{"w": torch.randn(n, generator=gen).bfloat16()} for _ in range(4)]
    method = fedavg({"w": torch.zeros(n, dtype=torch.bfloat16)})
    method.add(updates[0], 1.0)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        method.add_many(updates[1:3], [2.0, 3.0])
        method.add(updates[3], 4.0)
    allocations = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocations, "the profiler saw the conversion buffers"
    assert max(allocations) <= linear.CONVERT_BLOCK * 4
    assert torch.equal(
        method.result().model["w"],
        aggregate({"w": torch.zeros(n, dtype=torch.bfloat16)}, updates, [1.0, 2.0, 3.0, 4.0])["w"],
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    """Accumulating on the GPU gives the CPU result within float32 tolerance, on the CPU."""
    gen = torch.Generator().manual_seed(7)
    base = random_state(gen)
    updates = [random_state(gen) for _ in range(4)]
    weights = [5.0, 17.0, 1.0, 250.0]
    on_cpu = aggregate(base, updates, weights)
    method = fedavg(base, torch.device("cuda"))
    for update, weight in zip(updates, weights, strict=True):
        method.add(update, weight)
    on_gpu = method.result().model
    for name, tensor in on_gpu.items():
        assert tensor.device.type == "cpu"
        if tensor.dtype.is_floating_point:
            torch.testing.assert_close(tensor, on_cpu[name])
        else:
            assert torch.equal(tensor, on_cpu[name]), name
