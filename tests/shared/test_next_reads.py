"""`NextReads`: callers needing a read at the same time share one, and a caller never takes a read
that started before it asked (a handler's count could miss its own report)."""

from __future__ import annotations

import asyncio

from shared.coalesce import NextReads


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
