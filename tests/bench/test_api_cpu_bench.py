"""The API CPU bench at a small size: every request it times was answered as expected (the bench
raises otherwise) and every figure is there. Figures are never asserted: timing is not a test."""

from __future__ import annotations

from bench.api_cpu import run


async def test_api_cpu_bench_runs_every_request_kind() -> None:
    result = await run(clients=6, rounds=2)
    kinds = ("floor", "healthz", "upload", "test_report")
    assert set(result["us_per_request"]) == set(kinds)
    for kind in kinds:
        assert len(result["us_per_request"][kind]) == 2
        assert all(us > 0 for us in result["us_per_request"][kind])
    assert result["x_floor"]["floor"] == 1.0
