"""The stream memory bench at a small size: each server held every stream (the bench raises
otherwise, and checks from the notifier's metrics which path served them) and every figure is
there. Figures are never asserted: memory readings at this size are noise, not a test."""

from __future__ import annotations

from bench.stream_memory import run, table


async def test_stream_memory_bench_holds_every_stream_on_each_server() -> None:
    result = await run(20)
    assert result["streams"] == 20
    assert set(result["servers"]) == {"floor", "socket", "asgi"}
    for figures in result["servers"].values():
        assert figures["rss_after_mib"] > 0
        assert figures["open_s"] > 0
    assert set(result["x_floor"]) == {"floor", "socket", "asgi"}
    assert "| socket |" in table(result)
