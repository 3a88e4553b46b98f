"""The API's CPU per report request, in process: N clients upload (or report test metrics) at once.

    .venv/bin/python bench/api_cpu.py                  # 1,000 clients, 5 rounds, uploads and reports
    .venv/bin/python bench/api_cpu.py --clients 100 --rounds 3 --json /tmp/api_cpu.json
    .venv/bin/python bench/api_cpu.py --postgres          # PostgreSQL and its blob store (distributed)

What `bench/e2e.py` cannot isolate on a shared 2-core machine (its rounds move with everything else
that runs): the API app's own work per request, with no network, HTTP parsing or other service in
the way. The app is called as ASGI (`create_app` over SQLite and local blobs, as embedded mode), every
request of a round at once, and the process's CPU time divided by the requests. Nothing consumes
the bus: the bench moves each training's round itself, as the orchestrator would. The baseline,
measured in the same run and the same way, is a bare Starlette app answering `{"ok": true}` (the
floor of an ASGI request in Python on this machine); each figure is also given as a multiple of it.
`GET /healthz` is the app's own floor (middleware and routing: the report routes are matched
first, so a probe walks past them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import add_postgres_flag, async_url, create_database, drop_database
from services.api.main import create_app
from services.api.settings import ApiSettings
from shared.auth import new_token
from shared.bus.memory import InMemoryBus
from shared.codec import make_record, packb, tensor_map
from shared.db.models import Training
from shared.enums import RoundPhase, TrainingState
from shared.logging import configure_logging
from shared.runtime import Runtime, collect_less_often, freeze_startup_heap
from shared.settings import CommonSettings

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class Caller:
    """Calls an ASGI app the way a server would: one request, its body in one message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, method: str, path: str, token: str | None = None, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, bytes]:
        headers = [(b"host", b"bench")]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        if body:
            headers += [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 1),
            "server": ("bench", 80),
        }
        sent = False
        disconnected = asyncio.Event()
        out: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            out.append(message)

        await self.app(scope, receive, send)
        disconnected.set()
        status = next(m["status"] for m in out if m["type"] == "http.response.start")
        payload = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
        return status, payload


async def _json(call: Caller, method: str, path: str, token: str, doc: object, expect: int = 201) -> Any:
    status, payload = await call(method, path, token, json.dumps(doc).encode(), "application/json")
    if status != expect:
        raise RuntimeError(f"{method} {path}: {status} {payload[:300]!r}")
    return json.loads(payload)


def _expect(call: Caller, status_wanted: int, *args: Any) -> Callable[[], Awaitable[None]]:
    """A request that must answer `status_wanted`."""

    async def request() -> None:
        status, payload = await call(*args)
        if status != status_wanted:
            raise RuntimeError(f"{args[0]} {args[1]}: {status} {payload[:300]!r}")

    return request


async def _cpu_per_request(requests: Sequence[Callable[[], Awaitable[None]]]) -> float:
    """All `requests` at once; the process's CPU seconds per request.

    First a pause: what the previous batch left to do (the relay publishing and deleting its outbox
    rows) would otherwise be counted against this one."""
    await asyncio.sleep(0.3)
    cpu = time.process_time()
    await asyncio.gather(*(r() for r in requests))
    return (time.process_time() - cpu) / len(requests)


async def run(clients: int, rounds: int, postgres_dsn: str | None = None) -> dict[str, Any]:
    """The figures of one run; with `postgres_dsn` over a fresh PostgreSQL database (dropped after)
    with the PostgreSQL blob store, as distributed mode runs, else SQLite and local blobs."""
    folder = Path(tempfile.mkdtemp(prefix="fedhub-api-cpu-"))
    database = None if postgres_dsn is None else await create_database(postgres_dsn)
    try:
        if postgres_dsn is not None and database is not None:
            common = CommonSettings(
                database_url=async_url(postgres_dsn, database), blob_path=folder, blob_backend="postgres"
            )
        else:
            common = CommonSettings(
                database_url=f"sqlite+aiosqlite:///{folder / 'fedhub.db'}", blob_path=folder / "blobs"
            )
        return await _run(common, clients, rounds)
    finally:
        if postgres_dsn is not None and database is not None:
            await drop_database(postgres_dsn, database)


async def _run(common: CommonSettings, clients: int, rounds: int) -> dict[str, Any]:
    runtime = await Runtime.open(common, bus=InMemoryBus(), create_tables=True)
    admin = new_token()
    app = create_app(
        ApiSettings(admin_token=admin, database_url=common.database_url, blob_path=common.blob_path), runtime
    )
    call = Caller(app)
    results: dict[str, list[float]] = {"floor": [], "healthz": [], "upload": [], "test_report": []}

    async def ok(_request: object) -> JSONResponse:
        return JSONResponse({"ok": True})

    floor = Caller(Starlette(routes=[Route("/ok", ok)]))
    try:
        async with app.router.lifespan_context(app):
            tokens: list[str] = []
            ids: list[str] = []
            for i in range(clients):
                made = await _json(call, "POST", "/v1/principals", admin, {"name": f"c{i}", "role": "client"})
                ids.append(made["id"])
                tokens.append(made["token"])
            weights = make_record("w", "float32", [10, 10], np.ones((10, 10), np.float32).tobytes())
            status, payload = await call(
                "POST", "/v1/models", admin, packb({"tensors": tensor_map([weights])}), "application/msgpack"
            )
            if status != 201:
                raise RuntimeError(f"model upload: {status} {payload[:300]!r}")
            model_id = json.loads(payload)["id"]
            training = await _json(
                call,
                "POST",
                "/v1/trainings",
                admin,
                {"model_id": model_id, "clients": ids, "aggregation": "fedavg", "rounds": rounds},
            )
            training_id = UUID(training["id"])
            # As a serving process runs (`fedhub serve`, the standalone API): the start-up heap
            # frozen, the collector run every 20,000 allocations.
            collect_less_often()
            freeze_startup_heap()
            updates = f"/v1/trainings/{training_id}/updates"
            reports = f"/v1/trainings/{training_id}/test-metrics"

            async def move(round_: int, phase: RoundPhase) -> None:
                async with runtime.uow() as uow:
                    row = await uow.session.get(Training, training_id)
                    assert row is not None
                    row.state, row.phase, row.round = TrainingState.ONGOING, phase, round_

            def expecting(status_wanted: int, *args: Any) -> Callable[[], Awaitable[None]]:
                return _expect(call, status_wanted, *args)

            for round_ in range(1, rounds + 1):
                results["floor"].append(
                    await _cpu_per_request([_expect(floor, 200, "GET", "/ok") for _ in range(clients)])
                )
                results["healthz"].append(
                    await _cpu_per_request([expecting(200, "GET", "/healthz") for _ in range(clients)])
                )
                await move(round_, RoundPhase.COLLECTING)
                body = packb({"round": round_, "num_examples": 1, "tensors": tensor_map([weights])})
                results["upload"].append(
                    await _cpu_per_request(
                        [expecting(201, "POST", updates, t, body, "application/msgpack") for t in tokens]
                    )
                )
                await move(round_, RoundPhase.TESTING)
                report = json.dumps(
                    {"round": round_, "num_examples": 1, "metrics": {"accuracy": 0.5}}
                ).encode()
                results["test_report"].append(
                    await _cpu_per_request(
                        [expecting(201, "POST", reports, t, report, "application/json") for t in tokens]
                    )
                )
    finally:
        await runtime.close()
    # The first round also fills the caches (callers, participants, the training's view): reported apart.
    steady = {k: v[1:] if len(v) > 1 else v for k, v in results.items()}
    base = statistics.median(steady["floor"])
    return {
        "clients": clients,
        "rounds": rounds,
        "us_per_request": {k: [round(x * 1e6, 1) for x in v] for k, v in results.items()},
        "median_us_after_first_round": {k: round(statistics.median(v) * 1e6, 1) for k, v in steady.items()},
        "x_floor": {k: round(statistics.median(v) / base, 2) for k, v in steady.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    add_postgres_flag(
        parser, "PostgreSQL (a fresh database, dropped after) and its blob store instead of SQLite"
    )
    args = parser.parse_args()
    configure_logging("INFO")  # as `fedhub serve` runs: what is logged per request is part of the cost
    result = asyncio.run(run(args.clients, args.rounds, args.postgres))
    where = "PostgreSQL" if args.postgres else "SQLite"
    print(f"API CPU per request, in process over ASGI ({where}), {args.clients} clients at once,", end=" ")
    print(f"{args.rounds} rounds")
    print(f"{'request':<14}{'median us (rounds 2+)':>24}{'x floor':>10}   per round (us)")
    for name, median in result["median_us_after_first_round"].items():
        per_round = ", ".join(f"{x:.0f}" for x in result["us_per_request"][name])
        print(f"{name:<14}{median:>24.0f}{result['x_floor'][name]:>10.2f}   {per_round}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
