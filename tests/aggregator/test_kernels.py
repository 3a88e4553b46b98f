"""The fused float16/bfloat16 fold kernel: bit for bit torch's unfused lerp, close to float64, and
the linear methods' windowed and one-at-a-time folds equal with it and without it (no numba)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from services.aggregator.methods import FedAvg, RoundContext, kernels, linear
from shared.aggregation import FedAvgParams

HALF = [torch.bfloat16, torch.float16]
SPECIALS = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 6e4, -6e4])

needs_numba = pytest.mark.skipif(kernels.load() is None, reason="numba is not installed")


def values(n: int, dtype: torch.dtype, gen: torch.Generator, *, specials: bool = True) -> torch.Tensor:
    """Random values, a tenth of them NaN, infinities, signed zeros, subnormals or near float16's max."""
    x = torch.randn(n, generator=gen) * 3
    if specials:
        where = torch.rand(n, generator=gen) < 0.1
        x[where] = SPECIALS[torch.randint(0, len(SPECIALS), (int(where.sum()),), generator=gen)]
    return x.to(dtype)


def torch_fold(
    acc: torch.Tensor, steps: list[tuple[torch.Tensor, float]], first: torch.Tensor | None
) -> torch.Tensor:
    """The unfused path: a whole-tensor float32 copy of each value, then lerp_."""
    if first is not None:
        acc.copy_(first)
    for x, f in steps:
        acc.lerp_(x.float(), f)
    return acc


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit for bit (signed zeros too), NaN where the other is NaN (any payload)."""
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32))


@needs_numba
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 33, 1001])
@pytest.mark.parametrize("count", [1, 2, 4, 5, 9])
@pytest.mark.parametrize("first", [True, False])
def test_the_kernel_is_torchs_lerp_bit_for_bit(dtype, n, count, first, monkeypatch):
    """Any size (vector tails included), 1 to 9 values (several passes, in blocks), weights on both
    sides of 0.5 and exactly 0.5 and 1, NaN, infinities and signed zeros: torch's exact bits."""
    monkeypatch.setattr(kernels, "BLOCK", 32)
    gen = torch.Generator().manual_seed(n * 100 + count * 2 + first)
    xs = [values(n, dtype, gen) for _ in range(count)]
    weights = [0.5, 1.0, *torch.rand(count, generator=gen).tolist()][:count]
    start = torch.randn(n, generator=gen)
    start[0] = float("inf")
    head, steps = (xs[0], list(zip(xs[1:], weights[1:], strict=True))) if first else (None, [])
    if not first:
        steps = list(zip(xs, weights, strict=True))
    want = torch_fold(start.clone(), steps, head)
    got = start.clone()
    assert kernels.fold_half(got, steps, first=head)
    assert_same_bits(got, want)


@needs_numba
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_large_tensor_split_across_threads_is_still_torchs_lerp(dtype, threads):
    """A tensor long enough for two threads (an odd length, so the ranges are uneven): the same bits."""
    n = 2 * kernels.PARALLEL_MIN + 7
    gen = torch.Generator().manual_seed(threads)
    xs = [values(n, dtype, gen) for _ in range(6)]
    steps = list(zip(xs[1:], [1 / 2, 1 / 3, 0.7, 1 / 5, 1 / 6], strict=True))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.empty(n)
        assert kernels.fold_half(got, steps, first=xs[0])
    finally:
        torch.set_num_threads(previous)
    assert_same_bits(got, torch_fold(torch.empty(n), steps, xs[0]))


@needs_numba
@pytest.mark.parametrize("dtype", HALF)
def test_the_kernel_is_close_to_a_float64_mean(dtype):
    """Folding 7 updates with weights n_k / N_k gives their weighted mean within float32 rounding."""
    gen = torch.Generator().manual_seed(11)
    n = 5003
    xs = [values(n, dtype, gen, specials=False) for _ in range(7)]
    counts = [float(c) for c in torch.randint(1, 1000, (7,), generator=gen)]
    steps = [(x, c / sum(counts[: k + 2])) for k, (x, c) in enumerate(zip(xs[1:], counts[1:], strict=True))]
    got = torch.empty(n)
    assert kernels.fold_half(got, steps, first=xs[0])
    stacked = np.stack([x.double().numpy() for x in xs])
    want = np.average(stacked, axis=0, weights=counts)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


@needs_numba
def test_the_kernel_writes_no_float32_copy_of_an_update():
    """The fused fold allocates nothing through torch: no float32 copy, not even a block's."""
    n = 1 << 18
    gen = torch.Generator().manual_seed(2)
    xs = [values(n, torch.bfloat16, gen) for _ in range(4)]
    acc = torch.empty(n)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        assert kernels.fold_half(acc, [(x, 0.25) for x in xs[1:]], first=xs[0])
    assert max((e.cpu_memory_usage for e in prof.events()), default=0) < 4096


def test_what_the_kernel_does_not_take_is_left_to_torch():
    """float32 values, mixed dtypes, a non-contiguous accumulator or nothing to fold: False, untouched."""
    acc = torch.zeros(4)
    half = torch.ones(4, dtype=torch.bfloat16)
    assert not kernels.fold_half(acc, [(torch.ones(4), 0.5)])
    assert not kernels.fold_half(acc, [(half, 0.5), (half.half(), 0.5)])
    assert not kernels.fold_half(acc, [])
    assert not kernels.fold_half(torch.zeros(4, 2).t(), [(torch.ones(2, 4, dtype=torch.bfloat16), 0.5)])
    assert torch.equal(acc, torch.zeros(4))


def fedavg(base):
    return FedAvg(RoundContext(base=base, device=torch.device("cpu")), FedAvgParams())


@pytest.fixture(params=["fused", "torch"])
def path(request, monkeypatch):
    """Each test below runs with the fused kernel (where numba is installed) and without it."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "load", lambda: None)
    elif kernels.load() is None:
        pytest.skip("numba is not installed")
    return request.param


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("window", [1, 3, 4, 6])
def test_windows_and_single_adds_agree_bit_for_bit(path, dtype, window, monkeypatch):
    """FedAvg over half-precision tensors of odd and tiny sizes (a scalar, an empty one), windows
    against one add per update, a zero-weight NaN update among them: the same model either way."""
    monkeypatch.setattr(linear, "CONVERT_BLOCK", 64)
    monkeypatch.setattr(kernels, "BLOCK", 64)
    gen = torch.Generator().manual_seed(window)
    shapes = {"w": (37, 11), "b": (3,), "s": (), "e": (0, 4)}
    base = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
    updates = [{k: values(t.numel(), dtype, gen).reshape(t.shape) for k, t in base.items()} for _ in range(6)]
    weights = [float(w) for w in torch.randint(1, 400, (6,), generator=gen)]
    weights[2] = 0.0
    updates[2]["w"].fill_(float("nan"))
    windowed, single = fedavg(base), fedavg(base)
    for start in range(0, 6, window):
        windowed.add_many(updates[start : start + window], weights[start : start + window])
    for update, weight in zip(updates, weights, strict=True):
        single.add(update, weight)
    got, want = windowed.result().model, single.result().model
    for name, tensor in want.items():
        assert tensor.dtype == dtype and tensor.shape == base[name].shape, name
        assert_same_bits(got[name].float(), tensor.float())


@pytest.mark.parametrize("dtype", HALF)
def test_the_fused_and_torch_paths_give_the_same_model(dtype, monkeypatch):
    """The same round with and without numba: equal bits, so pods may differ in having it."""
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.zeros(4099, dtype=dtype), "b": torch.zeros(5, dtype=dtype)}
    updates = [{k: values(t.numel(), dtype, gen) for k, t in base.items()} for _ in range(9)]
    weights = [float(w) for w in torch.randint(1, 400, (9,), generator=gen)]

    def round_model():
        method = fedavg(base)
        for start in range(0, 9, 4):
            method.add_many(updates[start : start + 4], weights[start : start + 4])
        return method.result().model

    fused = round_model()
    monkeypatch.setattr(kernels, "load", lambda: None)
    unfused = round_model()
    for name, tensor in unfused.items():
        assert_same_bits(fused[name].float(), tensor.float())


def test_without_numba_there_is_no_kernel(monkeypatch):
    """numba not importable: `load` gives None (and `fold_half` then False), nothing raised."""
    import services.aggregator.methods as methods

    monkeypatch.setitem(sys.modules, "services.aggregator.methods._numba_kernel", None)
    monkeypatch.delattr(methods, "_numba_kernel", raising=False)
    assert kernels.load.__wrapped__() is None
