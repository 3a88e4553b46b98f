"""The shared LRU: bounded by count or by weight, least recently used dropped first."""

from __future__ import annotations

from shared.lru import Lru


def test_count_bound_drops_the_least_recently_used() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # "a" is now the most recent
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3)
    assert len(lru) == 2


def test_weight_bound_counts_bytes_and_a_replaced_entry_once() -> None:
    lru: Lru[str, bytes] = Lru(10, weigh=len)
    lru.put("a", b"xxxx")
    lru.put("a", b"yyyy")  # replaced, not added twice
    lru.put("b", b"zzzzzz")
    assert (lru.get("a"), lru.get("b")) == (b"yyyy", b"zzzzzz")
    lru.put("c", b"w")
    assert lru.get("a") is None
    assert [k for k, _ in lru.items()] == ["b", "c"]


def test_pop_returns_the_value_and_frees_its_weight() -> None:
    lru: Lru[str, bytes] = Lru(4, weigh=len)
    lru.put("a", b"xxxx")
    assert lru.pop("a") == b"xxxx"
    assert lru.pop("a") is None
    lru.put("b", b"yyyy")
    assert lru.get("b") == b"yyyy"


def test_items_is_a_snapshot_that_allows_popping() -> None:
    lru: Lru[int, int] = Lru(5)
    for i in range(5):
        lru.put(i, i)
    for key, value in lru.items():
        if value % 2:
            lru.pop(key)
    assert [k for k, _ in lru.items()] == [0, 2, 4]
