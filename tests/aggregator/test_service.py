"""The aggregator service's lifecycle: settings, device choice, draining on stop, `main()` under SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from sqlalchemy import select

from services.aggregator.engine import resolve_device
from services.aggregator.service import Aggregator
from services.aggregator.settings import AggregatorSettings, DeviceUnavailable
from shared.blobs import content_key
from shared.bus import envelope_for
from shared.codec import encode_tensors
from shared.db.models import Model
from shared.events import AggregateRound, UpdateRef
from shared.runtime import Runtime
from shared.tensors import state_dict_to_records
from tests.aggregator.fakes import GatedBlobStore

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_settings_read_their_own_environment_names(monkeypatch):
    """FEDHUB_AGGREGATOR_* set the aggregator's fields; shared fields keep their FEDHUB_* names."""
    monkeypatch.setenv("FEDHUB_AGGREGATOR_DEVICE", "cpu")
    monkeypatch.setenv("FEDHUB_AGGREGATOR_PREFETCH", "3")
    monkeypatch.setenv("FEDHUB_AGGREGATOR_TORCH_THREADS", "2")
    monkeypatch.setenv("FEDHUB_AGGREGATOR_BATCH_SIZE", "16")
    monkeypatch.setenv("FEDHUB_AGGREGATOR_SHARDS", "4")
    monkeypatch.setenv("FEDHUB_DATABASE_URL", "sqlite+aiosqlite:///x.db")
    settings = AggregatorSettings()
    assert (settings.device, settings.prefetch, settings.torch_threads) == ("cpu", 3, 2)
    assert (settings.batch_size, settings.shards) == (16, 4)
    assert settings.database_url == "sqlite+aiosqlite:///x.db"
    assert AggregatorSettings(device="cuda", prefetch=4).prefetch == 4


def test_auto_device_follows_cuda_availability():
    """auto is cuda exactly when torch sees a GPU; cpu is always cpu."""
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    """Asking for cuda where there is none raises DeviceUnavailable instead of failing every job."""
    with pytest.raises(DeviceUnavailable):
        resolve_device("cuda")


async def test_stop_waits_for_the_running_job_to_commit(settings):
    """stop() returns only once the job in flight has committed its model."""
    runtime = await Runtime.open(settings, create_tables=True)
    blobs = GatedBlobStore(settings.blob_path)
    await runtime.blobs.close()  # the runtime's own store (its database pool) gives way
    runtime.blobs = blobs
    try:
        state = {"w": torch.arange(4, dtype=torch.float32)}
        data = encode_tensors(state_dict_to_records(state))
        key, _ = content_key(data)
        await blobs.put(key, data)
        blobs.gated.add(key)
        # An orphan round (no rows needed): the handler reads only blobs, then writes its own rows.
        job = AggregateRound(
            job_id=uuid4(),
            training_id=uuid4(),
            round=1,
            method="fedavg",
            base_model_id=uuid4(),
            base_blob_key=key,
            updates=(UpdateRef(update_id=uuid4(), client_id=uuid4(), blob_key=key, num_examples=5),),
            delete_updates_after=False,
        )
        aggregator = Aggregator(settings, runtime)
        await aggregator.start()
        await runtime.bus.publish([envelope_for(job)])
        await asyncio.wait_for(blobs.entered.wait(), timeout=10)

        stopping = asyncio.create_task(aggregator.stop())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not stopping.done()

        blobs.release.set()
        await asyncio.wait_for(stopping, timeout=10)
        async with runtime.uow() as uow:
            model = await uow.session.scalar(select(Model).where(Model.training_id == job.training_id))
        assert model is not None
        assert model.owner_id is None
    finally:
        await runtime.close()


async def test_main_serves_until_sigterm(tmp_path):
    """`python -m services.aggregator.service` starts, and on SIGTERM stops and exits 0."""
    settings = AggregatorSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'fedhub.db'}",
        blob_path=tmp_path / "blobs",
        outbox_poll_s=60,
    )
    runtime = await Runtime.open(settings, create_tables=True)
    await runtime.close()
    env = {
        **os.environ,
        "FEDHUB_DATABASE_URL": settings.database_url,
        "FEDHUB_BLOB_PATH": str(settings.blob_path),
        "FEDHUB_AGGREGATOR_DEVICE": "cpu",
        "FEDHUB_LOG_FORMAT": "json",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.aggregator.service",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    stderr = proc.stderr
    assert stderr is not None
    try:

        async def read_until(event: str) -> list[str]:
            lines: list[str] = []
            while True:
                line = (await stderr.readline()).decode()
                if not line:
                    pytest.fail(f"the process ended before logging {event}: {''.join(lines)}")
                lines.append(line)
                if event in line:
                    return lines

        await asyncio.wait_for(read_until("aggregator.started"), timeout=60)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(read_until("aggregator.stopped"), timeout=30)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
