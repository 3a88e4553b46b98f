"""A bounded least-recently-used mapping: the one in-process cache shape the services share."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


class Lru(Generic[K, V]):
    """Keeps entries while their total weight is at most `size`, dropping the least recently used.

    Each entry weighs `weigh(value)` (1 by default, so `size` counts entries; `len` makes it bytes).
    """

    def __init__(self, size: int, weigh: Callable[[V], int] = _one) -> None:
        self.size = size
        self._weigh = weigh
        self._weight = 0
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[K, V]]:
        """The entries, least recently used first (a snapshot: safe to `pop` while iterating)."""
        return iter(list(self._entries.items()))

    def get(self, key: K) -> V | None:
        """The entry, now the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value` as the most recently used, dropping the oldest entries beyond `size`."""
        self.pop(key)
        self._entries[key] = value
        self._weight += self._weigh(value)
        while self._weight > self.size and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self._weight -= self._weigh(dropped)

    def pop(self, key: K) -> V | None:
        """Drop `key`'s entry; the value it had, or None."""
        value = self._entries.pop(key, None)
        if value is not None:
            self._weight -= self._weigh(value)
        return value
