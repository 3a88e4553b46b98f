"""Client-side CPU per HTTP request: the SDK's transport against plain httpx and plain aiohttp.

A bare Starlette app under uvicorn (httptools) runs in a child process and answers each POST of a
600-byte body with a small JSON document, as the upload route does. In this process N clients (each
its own connection pool, as the SDK's simulated clients have) post at once, round after round; the
figure is this process's CPU (user + system) per request over the rounds after the first, so it
measures what one process of simulated clients spends per upload, whatever the server costs.

    .venv/bin/python bench/client_http.py                   # 1,000 clients, 5 rounds
    .venv/bin/python bench/client_http.py --clients 100 --rounds 20 --json /tmp/client_http.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from fedhub.client.transport import Transport

BODY = b"x" * 600
HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/msgpack"}
PATH = "/v1/trainings/t/updates"

SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def upload(request):
    await request.body()
    return Response(b'{"update_id": "u", "round": 1, "duplicate": false}', media_type="application/json")

app = Starlette(routes=[Route(sys.argv[2], upload, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http="httptools",
            access_log=False)
"""


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Post = Callable[[], Awaitable[None]]


async def with_httpx(url: str, n: int) -> tuple[list[Post], Callable[[], Awaitable[None]]]:
    clients = [httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) for _ in range(n)]

    def post(client: httpx.AsyncClient) -> Post:
        async def once() -> None:
            response = await client.post(url, content=BODY, headers=HEADERS)
            response.raise_for_status()
            response.json()

        return once

    async def close() -> None:
        for client in clients:
            await client.aclose()

    return [post(c) for c in clients], close


async def with_aiohttp(url: str, n: int) -> tuple[list[Post], Callable[[], Awaitable[None]]]:
    sessions = [aiohttp.ClientSession() for _ in range(n)]

    def post(session: aiohttp.ClientSession) -> Post:
        async def once() -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                response.raise_for_status()
                json.loads(await response.read())

        return once

    async def close() -> None:
        for session in sessions:
            await session.close()

    return [post(s) for s in sessions], close


async def with_sdk(url: str, n: int) -> tuple[list[Post], Callable[[], Awaitable[None]]]:
    base = url.removesuffix(PATH)
    transports = [Transport(base, "bench") for _ in range(n)]

    def post(transport: Transport) -> Post:
        async def once() -> None:
            reply = await transport.request(
                "POST", PATH, content=BODY, headers={"Content-Type": "application/msgpack"}
            )
            reply.json()

        return once

    async def close() -> None:
        for transport in transports:
            await transport.aclose()

    return [post(t) for t in transports], close


CLIENTS = {"httpx": with_httpx, "aiohttp": with_aiohttp, "SDK (fedhub Transport)": with_sdk}


async def measure(name: str, url: str, n: int, rounds: int) -> dict[str, Any]:
    posts, close = await CLIENTS[name](url, n)
    per_round: list[float] = []
    try:
        for _ in range(rounds):
            before = cpu_s()
            await asyncio.gather(*(post() for post in posts))
            per_round.append((cpu_s() - before) / n * 1e6)
    finally:
        await close()
    steady = per_round[1:] or per_round
    return {"client": name, "cpu_us_median": round(statistics.median(steady)), "cpu_us": per_round}


async def run(url: str, n: int, rounds: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as probe:
        for _ in range(200):
            try:
                await probe.post(url, content=b"")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    return [await measure(name, url, n, rounds) for name in CLIENTS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), PATH])
    try:
        rows = asyncio.run(run(f"http://127.0.0.1:{port}{PATH}", args.clients, args.rounds))
    finally:
        server.terminate()
        server.wait(10)
    base = next(r["cpu_us_median"] for r in rows if r["client"] == "httpx")
    print(f"Client CPU per request, {args.clients} clients posting at once, {args.rounds} rounds")
    print(f"{'client':<24}{'median us (rounds 2+)':>22}{'x httpx':>10}   per round (us)")
    for r in rows:
        ratio = r["cpu_us_median"] / base if base else float("nan")
        rounds = ", ".join(f"{v:.0f}" for v in r["cpu_us"])
        print(f"{r['client']:<24}{r['cpu_us_median']:>22}{ratio:>10.2f}   {rounds}")
    if args.json is not None:
        result = {"clients": args.clients, "rounds": args.rounds, "rows": rows}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
