"""`LocalBlobStore`: small blobs put at the same time are written in one worker-thread hop per
group, each put still getting its own outcome (created, already there, or its own error)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shared.blobs import LocalBlobStore
from shared.blobs import local as local_module


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions sent to a worker thread by the local store."""
    seen: list[str] = []
    real = asyncio.to_thread

    async def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(local_module.asyncio, "to_thread", counting)
    return seen


async def test_small_puts_at_once_share_a_thread_hop(tmp_path: Path, hops: list[str]) -> None:
    store = LocalBlobStore(tmp_path)
    created = await asyncio.gather(*(store.put(f"update/{i}", b"x" * (i + 1)) for i in range(50)))
    assert created == [True] * 50
    assert len(hops) <= 2  # the first put's group, then everything that arrived meanwhile
    assert [(tmp_path / "update" / str(i)).read_bytes() for i in range(50)] == [
        b"x" * (i + 1) for i in range(50)
    ]
    again = await asyncio.gather(store.put("update/3", b"other"), store.put("update/new", b"y"))
    assert again == [False, True]
    assert (tmp_path / "update" / "3").read_bytes() == b"xxxx"


async def test_a_large_put_takes_its_own_hop(tmp_path: Path, hops: list[str]) -> None:
    store = LocalBlobStore(tmp_path)
    big = b"z" * (local_module.GROUPED_BLOB + 1)
    assert await store.put("model/big", big)
    assert hops == ["_put"]
    assert (tmp_path / "model" / "big").read_bytes() == big


async def test_a_failing_write_fails_only_its_own_put(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    results = await asyncio.gather(
        store.put("fine/1", b"1"),
        store.put("blocked/2", b"2"),
        store.put("fine/3", b"3"),
        return_exceptions=True,
    )
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], OSError)
    assert await store.get("fine/1") == b"1" and await store.get("fine/3") == b"3"


async def test_a_put_whose_caller_stops_waiting_is_still_written(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    first = asyncio.create_task(store.put("update/a", b"a"))
    leaving = asyncio.create_task(store.put("update/b", b"b"))
    await asyncio.sleep(0)
    leaving.cancel()
    assert await first is True
    await asyncio.sleep(0.05)
    assert leaving.cancelled()
    assert await store.get("update/b") == b"b"
    assert await store.put("update/c", b"c") is True  # the store goes on writing groups
