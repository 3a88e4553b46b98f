"""Server processes the benches start and measure: run from a source tree, waited for until they
serve, terminated at the end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
"""The repository this bench belongs to."""


@contextlib.contextmanager
def server_process(
    argv: list[str], env: dict[str, str], log: Path, root: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` run from `root` (importable from there) with `env` added, its output in `log`;
    terminated at the end (killed if it takes longer than 20 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_serving(port: int, proc: subprocess.Popen[bytes], log: Path, path: str | None) -> None:
    """Until the server accepts connections (and answers 200 on `path`, if given)."""
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                output = await asyncio.to_thread(log.read_text)
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{output}")
            with contextlib.suppress(OSError, httpx.TransportError):
                if path is None:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    return
                if (await http.get(path)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{proc.args} did not start:\n{await asyncio.to_thread(log.read_text)}")
