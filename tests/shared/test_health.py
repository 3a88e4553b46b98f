"""The probe server of worker processes answers liveness and readiness truthfully."""

from __future__ import annotations

import httpx

from shared.health import HealthServer
from shared.metrics import REGISTRY, parse_exposition


async def test_liveness_always_and_readiness_follows_the_checks() -> None:
    """/healthz is 200; /readyz is 200 only while every check passes, else 503 with the reason."""
    problem: list[str | None] = [None]

    async def check() -> str | None:
        return problem[0]

    server = HealthServer("127.0.0.1", 0, [check])
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get("/readyz")).status_code == 200
            problem[0] = "database unreachable: boom"
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"error": "NotReady", "detail": "database unreachable: boom"}
            assert (await http.get("/nope")).status_code == 404
    finally:
        await server.stop()


async def test_metrics_answer_the_process_registry() -> None:
    """/metrics on the probe server is the process registry in Prometheus text, current at each call."""
    probe = REGISTRY.counter("fedhub_test_probe_total", "counted by the health test")
    server = HealthServer("127.0.0.1", 0, [])
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            before = await http.get("/metrics")
            probe.inc()
            after = await http.get("/metrics")
    finally:
        await server.stop()
    assert before.status_code == 200
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    key = ("fedhub_test_probe_total", frozenset())
    assert parse_exposition(after.text)[key] == parse_exposition(before.text).get(key, 0.0) + 1
