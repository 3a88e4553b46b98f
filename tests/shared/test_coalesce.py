"""`NextReads`: callers needing a read at the same time share one, and a caller never takes a read
that started before it asked (a handler's count could miss its own report). `Batches`: items
submitted while a batch is processed go into the next batch, each with its own outcome."""

from __future__ import annotations

import asyncio

import pytest

from shared.coalesce import Batches, NextReads


class Rows:
    """A stand-in table: `count` reports the rows there when the query *starts*, then takes a while."""

    def __init__(self) -> None:
        self.rows = 0
        self.queries = 0
        self.release = asyncio.Event()

    async def count(self) -> int:
        self.queries += 1
        seen = self.rows
        await self.release.wait()
        return seen


async def test_callers_together_share_one_count() -> None:
    counts, table = NextReads[int](), Rows()
    table.rows = 5
    waiting = [asyncio.create_task(counts.read(("updates", 1), table.count)) for _ in range(20)]
    await asyncio.sleep(0)
    table.release.set()
    assert await asyncio.gather(*waiting) == [5] * 20
    assert table.queries == 1


async def test_a_caller_arriving_during_a_count_gets_the_next_one_which_sees_its_row() -> None:
    counts, table = NextReads[int](), Rows()
    table.rows = 1
    first = asyncio.create_task(counts.read(("updates", 1), table.count))
    await asyncio.sleep(0.01)
    assert table.queries == 1  # running, and it saw one row
    table.rows = 3  # two more reports committed; their handlers ask now
    late = [asyncio.create_task(counts.read(("updates", 1), table.count)) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert table.queries == 1  # the next count waits for the running one
    table.release.set()
    assert await first == 1
    assert await asyncio.gather(*late) == [3, 3]
    assert table.queries == 2


async def test_counts_of_other_rounds_do_not_wait_for_each_other() -> None:
    counts, table = NextReads[int](), Rows()
    table.release.set()
    table.rows = 2
    assert await asyncio.gather(
        counts.read(("updates", 1), table.count), counts.read(("updates", 2), table.count)
    ) == [2, 2]
    assert table.queries == 2


async def test_a_failed_count_fails_its_callers_and_the_next_count_runs() -> None:
    counts = NextReads[int]()

    async def broken() -> int:
        raise RuntimeError("database gone")

    results = await asyncio.gather(
        *(counts.read(("updates", 1), broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)

    async def seven() -> int:
        return 7

    assert await counts.read(("updates", 1), seven) == 7


class Doubler:
    """A batch processor that records its batches, fails on negative items, and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def process(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        await self.release.wait()
        return [ValueError(f"negative: {i}") if i < 0 else 2 * i for i in items]


async def test_items_arriving_during_a_batch_form_the_next_one() -> None:
    doubler = Doubler()
    doubler.release.clear()
    batches: Batches[int, int] = Batches(doubler.process)
    first = asyncio.create_task(batches.submit(1))
    await asyncio.sleep(0)
    later = [asyncio.create_task(batches.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)
    doubler.release.set()
    assert await first == 2
    assert await asyncio.gather(*later) == [4, 6, 8]
    assert doubler.batches == [[1], [2, 3, 4]]


async def test_an_item_failing_fails_only_its_caller_and_a_failing_batch_all_of_its_callers() -> None:
    doubler = Doubler()
    batches: Batches[int, int] = Batches(doubler.process)
    results = await asyncio.gather(*(batches.submit(i) for i in (5, -1, 7)), return_exceptions=True)
    assert results[0] == 10 and results[2] == 14
    assert isinstance(results[1], ValueError)

    async def broken(items: list[int]) -> list[int | Exception]:
        raise RuntimeError("database gone")

    failing: Batches[int, int] = Batches(broken)
    outcomes = await asyncio.gather(*(failing.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    with pytest.raises(RuntimeError):
        await failing.submit(9)  # still working: a new batch for a new item


async def test_a_caller_that_stops_waiting_leaves_its_item_in_the_batch() -> None:
    doubler = Doubler()
    doubler.release.clear()
    batches: Batches[int, int] = Batches(doubler.process)
    staying = asyncio.create_task(batches.submit(1))
    leaving = asyncio.create_task(batches.submit(2))
    await asyncio.sleep(0)
    leaving.cancel()
    doubler.release.set()
    assert await staying == 2
    assert doubler.batches == [[1, 2]]
    assert leaving.cancelled()
