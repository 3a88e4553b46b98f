"""Memory of the notifier per open event stream, against the floor of holding a bare connection.

Each client keeps one `GET /v1/events` stream open for as long as it takes part, so what an idle
stream costs the notifier is memory per client. This bench starts a real `fedhub notifier` process
(SQLite in a temp folder, the in-memory bus), creates `--streams` client principals in its
database, and opens one stream per client from this process (raw asyncio connections: no client
library's memory in the figures). The server's resident memory (`VmRSS` of /proc/<pid>/status) is
read after a warm-up of a few streams and again once every stream has its response head; the
difference divided by the streams is the cost of one. Three servers, in the same run:

- `socket`: `fedhub notifier` as it runs by default: a stream that opens its connection is served
  straight off the socket (services/notifier/direct.py);
- `asgi`: the same with `FEDHUB_SOCKET_STREAMS=false`: every stream through uvicorn and the app;
- `floor`: a bare asyncio server that answers each connection's request head and holds it, what
  any Python server pays for an open connection.

The notifier's `/metrics` confirms which path served the streams (the bench fails otherwise).

    python bench/stream_memory.py --streams 1000 --json /tmp/stream_memory.json
    python bench/stream_memory.py --postgres       # the notifiers over PostgreSQL, as distributed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

import services.notifier.models  # noqa: F401 - registers the notifier's tables before create_schema

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.e2e import add_postgres_flag, async_url, create_database, drop_database
from bench.processes import server_process, wait_serving
from fedhub.distributed import free_port
from shared.auth import hash_token, new_token
from shared.db.models import Principal
from shared.enums import Role
from shared.metrics import parse_exposition, total
from shared.runtime import Runtime
from shared.settings import CommonSettings

WARM_UP = 10
"""Streams opened before the first reading: the server's first-request allocations are not counted."""

FLOOR_SERVER = """
import asyncio, sys

class Held(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\\r\\ncontent-type: text/event-stream\\r\\n"
                             b"transfer-encoding: chunked\\r\\n\\r\\n")

async def main():
    server = await asyncio.get_running_loop().create_server(Held, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def rss_kib(pid: int) -> int:
    """The resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def make_clients(database_url: str, blob_path: Path, n: int) -> list[str]:
    """`n` client principals in the database; their bearer tokens."""
    runtime = await Runtime.open(
        CommonSettings(database_url=database_url, blob_path=blob_path), create_tables=True
    )
    tokens = [new_token() for _ in range(n)]
    try:
        async with runtime.uow() as uow:
            uow.session.add_all(
                Principal(name=f"client-{i}", role=Role.CLIENT, token_hash=hash_token(token))
                for i, token in enumerate(tokens)
            )
    finally:
        await runtime.close()
    return tokens


async def open_stream(port: int, token: str) -> asyncio.StreamWriter:
    """One `GET /v1/events` connection, returned once its response head (a 200) has arrived."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /v1/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"GET /v1/events answered {head.splitlines()[0]!r}")
    return writer


@contextlib.asynccontextmanager
async def streams(port: int, tokens: list[str]) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """Open one stream per token, all at once as clients do when a training starts; close them all
    at the end."""
    writers: list[asyncio.StreamWriter] = []
    try:
        writers += await asyncio.gather(*(open_stream(port, t) for t in tokens))
        yield writers
    finally:
        for writer in writers:
            writer.close()


async def measure(pid: int, port: int, warm: list[str], tokens: list[str]) -> dict[str, float]:
    """The server's RSS after the warm-up streams and with every stream open."""
    async with streams(port, warm):
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        started = time.perf_counter()
        async with streams(port, tokens):
            opened_s = time.perf_counter() - started
            await asyncio.sleep(1.0)
            after = rss_kib(pid)
    return {
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(after / 1024, 1),
        "kib_per_stream": round((after - before) / len(tokens), 2),
        "open_s": round(opened_s, 3),
    }


async def notifier_run(
    n: int, socket_streams: bool, tmp: Path, postgres_dsn: str | None = None
) -> dict[str, float]:
    """A `fedhub notifier` process serving `n` streams (`tmp`: an empty folder of its own); over a
    fresh PostgreSQL database (dropped after) with `postgres_dsn`, else SQLite."""
    if postgres_dsn is None:
        return await _notifier_run(n, socket_streams, tmp, f"sqlite+aiosqlite:///{tmp / 'fedhub.db'}")
    database = await create_database(postgres_dsn)
    try:
        return await _notifier_run(n, socket_streams, tmp, async_url(postgres_dsn, database))
    finally:
        await drop_database(postgres_dsn, database)


async def _notifier_run(n: int, socket_streams: bool, tmp: Path, database_url: str) -> dict[str, float]:
    tokens = await make_clients(database_url, tmp / "blobs", WARM_UP + n)
    port = free_port()
    env = {
        "FEDHUB_DATABASE_URL": database_url,
        "FEDHUB_BLOB_PATH": str(tmp / "blobs"),
        "FEDHUB_HOST": "127.0.0.1",
        "FEDHUB_PORT": str(port),
        "FEDHUB_LOG_LEVEL": "warning",
        "FEDHUB_SOCKET_STREAMS": "true" if socket_streams else "false",
    }
    log = tmp / "notifier.log"
    with server_process([sys.executable, "-m", "fedhub.cli", "notifier"], env, log) as proc:
        await wait_serving(port, proc, log, "/readyz")
        figures = await measure(proc.pid, port, tokens[:WARM_UP], tokens[WARM_UP:])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            samples = parse_exposition((await http.get("/metrics")).text)
    opened = "fedhub_event_streams_opened_total"
    served = {kind: total(samples, opened, served_by=kind) for kind in ("socket", "asgi")}
    expected = "socket" if socket_streams else "asgi"
    if served[expected] != WARM_UP + n:
        raise RuntimeError(f"expected {WARM_UP + n} streams served by {expected}, the notifier says {served}")
    return figures


async def floor_run(n: int, tmp: Path) -> dict[str, float]:
    """The bare asyncio server holding `n` connections (`tmp`: a folder for its log)."""
    port = free_port()
    log = tmp / "floor.log"
    with server_process([sys.executable, "-c", FLOOR_SERVER, str(port)], {}, log) as proc:
        await wait_serving(port, proc, log, None)
        return await measure(proc.pid, port, ["-"] * WARM_UP, ["-"] * n)


async def run(n: int, postgres_dsn: str | None = None) -> dict[str, Any]:
    """Every server's figures with `n` streams, and each one's cost per stream over the floor's;
    the notifiers over PostgreSQL with `postgres_dsn` (as in distributed mode), else SQLite."""
    with tempfile.TemporaryDirectory(prefix="fedhub-stream-memory-") as tmp:
        for name in ("floor", "socket", "asgi"):
            os.mkdir(os.path.join(tmp, name))
        results = {
            "floor": await floor_run(n, Path(tmp) / "floor"),
            "socket": await notifier_run(n, True, Path(tmp) / "socket", postgres_dsn),
            "asgi": await notifier_run(n, False, Path(tmp) / "asgi", postgres_dsn),
        }
    floor = max(results["floor"]["kib_per_stream"], 0.01)
    return {
        "streams": n,
        "database": "sqlite" if postgres_dsn is None else "postgresql",
        "servers": results,
        "x_floor": {name: round(r["kib_per_stream"] / floor, 2) for name, r in results.items()},
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a markdown table."""
    lines = [
        f"Idle event streams: {result['streams']} (notifier over {result['database']})",
        "",
        "| server | RSS before (MiB) | RSS with the streams (MiB) | KiB per stream | x floor "
        "| open all (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in result["servers"].items():
        lines.append(
            f"| {name} | {r['rss_before_mib']} | {r['rss_after_mib']} | {r['kib_per_stream']} "
            f"| {result['x_floor'][name]} | {r['open_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000, help="streams held open at once")
    add_postgres_flag(
        parser, "the notifiers over a fresh PostgreSQL database (default server: the e2e bench's)"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result = asyncio.run(run(args.streams, args.postgres))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
