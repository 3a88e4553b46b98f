"""Peak memory of the API process while it takes a very large model and update (streamed msgpack).

Starts a real `fedhub api` process (SQLite in a temp folder, local blobs, tables created at start),
uploads a model of one float32 tensor of `--mb` MB, creates a training with one client, moves it to
ONGOING / COLLECTING round 1 directly in the database (no orchestrator runs here, so the training
is set as the orchestrator's start would leave it), then uploads an update of the same size. Both
bodies are generated chunk by chunk, so this client holds neither. The API's resident memory is read
from /proc/<pid>/status: `VmRSS` before each upload and the peak `VmHWM` after it (the peak is reset
through /proc/<pid>/clear_refs before each upload).

    python bench/upload_memory.py --mb 500 --json /tmp/upload_memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from uuid import UUID

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.processes import server_process, wait_serving
from fedhub.distributed import free_port
from shared.codec import packb, tensor_entry_prefix
from shared.db.models import ClientUpdate, Training
from shared.enums import RoundPhase, TrainingState
from shared.runtime import Runtime
from shared.settings import CommonSettings

MB = 1_000_000
PIECE = 64 * 1024
ADMIN_TOKEN = "fh_bench-admin-token"
MSGPACK = "application/msgpack"


@dataclass
class Row:
    """One upload's figures."""

    upload: str
    payload_mb: float
    api_rss_before_mb: float
    api_peak_rss_mb: float
    peak_minus_before_mb: float
    seconds: float
    mb_per_s: float


def status_kb(pid: int, field: str) -> int:
    """A `VmRSS` / `VmHWM` figure of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """Reset the process's peak RSS (`VmHWM`) to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def body(fields: dict[str, object], nbytes: int) -> AsyncIterator[bytes]:
    """A msgpack tensor document with one float32 tensor `w` of `nbytes`, generated piece by piece."""
    head = bytearray(bytes([0x80 | (len(fields) + 1)]))
    for key, value in fields.items():
        head += packb(key) + packb(value)
    head += packb("tensors") + b"\x81" + tensor_entry_prefix("w", "float32", (nbytes // 4,), nbytes)
    yield bytes(head)
    piece = np.full(PIECE // 4, 0.5, dtype=np.float32).tobytes()
    sent = 0
    while sent < nbytes:
        n = min(PIECE, nbytes - sent)
        yield piece[:n]
        sent += n


async def timed_upload(
    http: httpx.AsyncClient,
    pid: int,
    name: str,
    url: str,
    token: str,
    content: AsyncIterator[bytes],
    nbytes: int,
) -> tuple[Row, httpx.Response]:
    """POST a streamed body and measure the API's memory around it."""
    before = status_kb(pid, "VmRSS")
    reset_peak(pid)
    start = time.perf_counter()
    resp = await http.post(
        url, content=content, headers={"Authorization": f"Bearer {token}", "Content-Type": MSGPACK}
    )
    seconds = time.perf_counter() - start
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"{name} upload failed: {resp.status_code} {resp.text}")
    peak = status_kb(pid, "VmHWM")
    row = Row(
        upload=name,
        payload_mb=round(nbytes / MB, 1),
        api_rss_before_mb=round(before * 1024 / MB, 1),
        api_peak_rss_mb=round(peak * 1024 / MB, 1),
        peak_minus_before_mb=round((peak - before) * 1024 / MB, 1),
        seconds=round(seconds, 2),
        mb_per_s=round(nbytes / MB / seconds, 1),
    )
    return row, resp


async def run(mb: int, root: Path) -> list[Row]:
    """Start the API, upload a model and an update of `mb` MB each, return the figures."""
    nbytes = mb * MB // 4 * 4
    with tempfile.TemporaryDirectory(prefix="fedhub-upload-bench-") as tmp:
        folder = Path(tmp)
        database_url = f"sqlite+aiosqlite:///{folder / 'fedhub.db'}"
        port = free_port()
        env = {
            "FEDHUB_DATABASE_URL": database_url,
            "FEDHUB_BLOB_PATH": str(folder / "blobs"),
            "FEDHUB_ADMIN_TOKEN": ADMIN_TOKEN,
            "FEDHUB_PORT": str(port),
            "FEDHUB_CREATE_TABLES": "true",
            "FEDHUB_LOG_LEVEL": "WARNING",
        }
        log = folder / "api.log"
        timeout = httpx.Timeout(600, connect=10)
        with server_process([sys.executable, "-m", "fedhub.cli", "api"], env, log, root) as proc:
            await wait_serving(port, proc, log, "/readyz")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout) as http:
                admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                resp = await http.post(
                    "/v1/principals", json={"name": "site", "role": "client"}, headers=admin
                )
                client = resp.json()
                model_row, resp = await timed_upload(
                    http, proc.pid, "model", "/v1/models", ADMIN_TOKEN, body({"name": "big"}, nbytes), nbytes
                )
                model_id = resp.json()["id"]
                resp = await http.post(
                    "/v1/trainings",
                    json={"model_id": model_id, "clients": [client["id"]], "rounds": 1},
                    headers=admin,
                )
                training_id = UUID(resp.json()["id"])
                await open_round(database_url, folder, training_id)
                fields: dict[str, object] = {"round": 1, "num_examples": 10}
                update_row, resp = await timed_upload(
                    http,
                    proc.pid,
                    "update",
                    f"/v1/trainings/{training_id}/updates",
                    client["token"],
                    body(fields, nbytes),
                    nbytes,
                )
                await check_stored(database_url, folder, UUID(resp.json()["update_id"]), nbytes)
    return [model_row, update_row]


def _settings(database_url: str, folder: Path) -> CommonSettings:
    return CommonSettings(database_url=database_url, blob_path=folder / "blobs")


async def open_round(database_url: str, folder: Path, training_id: UUID) -> None:
    """Move the training to ONGOING / COLLECTING round 1, as the orchestrator's start would."""
    rt = await Runtime.open(_settings(database_url, folder))
    try:
        async with rt.uow() as uow:
            training = await uow.session.get(Training, training_id)
            assert training is not None
            training.state, training.phase, training.round = TrainingState.ONGOING, RoundPhase.COLLECTING, 1
    finally:
        await rt.close()


async def check_stored(database_url: str, folder: Path, update_id: UUID, nbytes: int) -> None:
    """The update row exists and its blob holds the tensor's bytes (plus the small canonical header)."""
    rt = await Runtime.open(_settings(database_url, folder))
    try:
        async with rt.uow() as uow:
            row = await uow.session.get(ClientUpdate, update_id)
        assert row is not None, "no update row"
        size = (folder / "blobs" / row.blob_key).stat().st_size
        assert nbytes < size < nbytes + 200, size
    finally:
        await rt.close()


def table(rows: list[Row]) -> str:
    """The figures as a small text table."""
    head = ["upload", "payload MB", "API RSS before MB", "API peak RSS MB", "peak - before MB", "s", "MB/s"]
    lines = [head] + [[str(v) for v in asdict(r).values()] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main() -> None:
    """Parse the options, run, print the table and optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="payload size in MB (10^6 bytes)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--api-root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="source tree the API runs from",
    )
    args = parser.parse_args()
    rows = asyncio.run(run(args.mb, args.api_root))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
