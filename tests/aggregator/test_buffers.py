"""The aggregator's buffer pool: what is lent again, what is never taken, and rounds that reuse it."""

from __future__ import annotations

import pytest
import torch

from services.aggregator.methods import METHODS, RoundContext
from services.aggregator.methods.buffers import BufferLease, BufferPool
from shared.aggregation import AggregationMethod, method_params

CPU = torch.device("cpu")


def test_a_given_back_buffer_is_lent_again_in_any_shape_of_its_size() -> None:
    pool = BufferPool(1 << 20)
    lease = pool.lease()
    t = lease.empty((4, 8), torch.float32)
    ptr = t.data_ptr()
    assert lease.give_back([t]) == 1
    assert pool.held_bytes == 128
    again = pool.lease().empty((8, 4), torch.float32)
    assert again.data_ptr() == ptr
    assert again.shape == (8, 4) and again.is_contiguous()
    assert pool.held_bytes == 0


def test_another_dtype_or_size_gets_a_fresh_buffer() -> None:
    pool = BufferPool(1 << 20)
    lease = pool.lease()
    t = lease.empty((32,), torch.float32)
    lease.give_back([t])
    other = pool.lease()
    assert other.empty((32,), torch.float64).data_ptr() != t.data_ptr()
    assert other.empty((31,), torch.float32).data_ptr() != t.data_ptr()
    assert pool.held_bytes == 128  # still waiting for a float32 request of 32 elements


def test_only_whole_buffers_this_lease_lent_are_taken() -> None:
    pool = BufferPool(1 << 20)
    lease = pool.lease()
    t = lease.empty((16,), torch.float32)
    foreign = torch.empty(16)
    assert lease.give_back([foreign, t[1:], t[:8], t.to(torch.float64)]) == 0
    assert pool.held_bytes == 0
    assert lease.give_back([t.view(4, 4), t]) == 1  # a view spanning it counts once
    other = pool.lease()
    assert other.give_back([pool.lease().empty((16,), torch.float32)]) == 0  # lent by another lease


def test_close_forgets_what_was_not_given_back() -> None:
    pool = BufferPool(1 << 20)
    lease = pool.lease()
    t = lease.empty((16,), torch.float32)
    lease.close()
    assert lease.give_back([t]) == 0
    assert pool.held_bytes == 0


def test_the_pool_keeps_at_most_max_bytes() -> None:
    pool = BufferPool(100)
    lease = pool.lease()
    a, b = lease.empty((16,), torch.float32), lease.empty((16,), torch.float32)
    assert lease.give_back([a, b]) == 1
    assert pool.held_bytes == 64
    with pytest.raises(ValueError, match="max_bytes"):
        BufferPool(-1)


def test_without_a_pool_buffers_are_fresh_and_nothing_is_kept() -> None:
    lease = BufferLease()
    t = lease.empty((2, 3), torch.float32)
    assert t.shape == (2, 3)
    assert lease.give_back([t]) == 0


def _updates(seed: int, dtype: torch.dtype, n: int = 5) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(300, 700, generator=gen).to(dtype),
            "b": torch.randn(700, generator=gen).to(dtype),
            "steps": torch.tensor(seed + i),
        }
        for i in range(n)
    ]


def _round(
    method: AggregationMethod,
    base: dict[str, torch.Tensor],
    updates: list[dict[str, torch.Tensor]],
    lease: BufferLease,
    state: dict[str, torch.Tensor] | None = None,
    window: int = 3,
):
    cls = METHODS[method]
    m = cls(RoundContext(base=base, device=CPU, state=state or {}, buffers=lease), method_params(method, {}))
    for i in range(0, len(updates), window):
        chunk = updates[i : i + window]
        m.add_many(chunk, [float(j + 1) for j in range(len(chunk))])
    return m.result()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "method", [AggregationMethod.FEDAVG, AggregationMethod.FEDAVGM, AggregationMethod.FEDADAM]
)
def test_rounds_reuse_the_pool_and_give_the_results_of_fresh_memory(
    method: AggregationMethod, dtype: torch.dtype
) -> None:
    """Three rounds in a row, each feeding the next (model and server state), with the pool and
    without: equal bit for bit; from the second round on the model's buffers are recycled ones."""
    base = {k: v for k, v in _updates(99, dtype, 1)[0].items()}
    pool = BufferPool(1 << 30)
    pooled_base, fresh_base = dict(base), dict(base)
    pooled_state: dict[str, torch.Tensor] = {}
    fresh_state: dict[str, torch.Tensor] = {}
    given_back: set[int] = set()
    for r in range(3):
        updates = _updates(r, dtype)
        lease = pool.lease()
        pooled = _round(method, pooled_base, updates, lease, pooled_state)
        fresh = _round(method, fresh_base, updates, BufferLease(), fresh_state)
        for name in base:
            assert torch.equal(pooled.model[name], fresh.model[name]), (r, name)
        for name in fresh.state:
            assert torch.equal(pooled.state[name], fresh.state[name]), (r, name)
        if r > 0 and method is AggregationMethod.FEDAVG:
            assert pooled.model["w"].data_ptr() in given_back, "the model landed in a recycled buffer"
        # What the handler does once the round is stored: the next round's base and state are
        # copies (they would be decoded from the stored blobs).
        pooled_base = {k: v.clone() for k, v in pooled.model.items()}
        pooled_state = {k: v.clone() for k, v in pooled.state.items()}
        fresh_base, fresh_state = dict(fresh.model), dict(fresh.state)
        given_back = {t.data_ptr() for t in pooled.model.values()}
        lease.give_back(pooled.model.values())
        lease.close()
    assert pool.held_bytes > 0


def test_a_bfloat16_round_gives_its_float32_accumulators_back_at_once() -> None:
    pool = BufferPool(1 << 30)
    updates = _updates(0, torch.bfloat16)
    lease = pool.lease()
    result = _round(AggregationMethod.FEDAVG, dict(updates[0]), updates, lease)
    # The float32 means are no longer needed once cast into the bfloat16 model.
    assert pool.held_bytes == (300 * 700 + 700) * 4
    assert result.model["w"].dtype == torch.bfloat16
    assert lease.give_back(result.model.values()) == 2
