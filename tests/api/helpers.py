"""Builders for the API tests: tensors, payloads in both encodings, and a spy on the bus."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from uuid import UUID

import httpx
import numpy as np
from sqlalchemy import func, select

from shared.bus import Envelope, InMemoryBus
from shared.codec import TensorRecord, decode_message, packb, tensor_map
from shared.db.models import Training
from shared.enums import RoundPhase, TrainingState
from shared.events import Message, TestReportsReceived, UpdatesReceived
from shared.runtime import Runtime

M = TypeVar("M", bound=Message)

ADMIN_TOKEN = "fh_test-admin-token"
MSGPACK = "application/msgpack"

# bfloat16 has no numpy dtype: its values are written as their bit patterns.
BF16_ONE, BF16_TWO, BF16_NAN, BF16_INF = 0x3F80, 0x4000, 0x7FC0, 0x7F80


class RecordingBus(InMemoryBus):
    """The real in-memory bus that also keeps every envelope the relay published through it."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[Envelope] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Record, then route as usual."""
        self.published.extend(envelopes)
        await super().publish(envelopes)


def record(name: str, array: np.ndarray, dtype: str | None = None) -> TensorRecord:
    """A tensor record over a numpy array's bytes (`dtype` overrides the name, e.g. bfloat16)."""
    array = np.ascontiguousarray(array)
    return TensorRecord(
        name=name, dtype=dtype or str(array.dtype), shape=tuple(array.shape), data=memoryview(array.tobytes())
    )


def model_tensors(scale: float = 1.0) -> dict[str, TensorRecord]:
    """A small model with float32, float16, bfloat16 and int64 tensors, by name (in model order)."""
    return {
        "w": record("w", (np.arange(6, dtype=np.float32) * scale).reshape(2, 3)),
        "b": record("b", np.full(3, scale, dtype=np.float32)),
        "h": record("h", np.full(4, scale, dtype=np.float16)),
        "g": record("g", np.array([BF16_ONE, BF16_TWO], dtype=np.uint16), dtype="bfloat16"),
        "steps": record("steps", np.array([7], dtype=np.int64)),
    }


def msgpack_body(records: dict[str, TensorRecord] | list[TensorRecord], **fields: Any) -> bytes:
    """A msgpack tensor payload with extra top-level fields."""
    recs = list(records.values()) if isinstance(records, dict) else records
    return packb({"tensors": tensor_map(recs), **fields})


def json_tensors(records: dict[str, TensorRecord] | list[TensorRecord]) -> dict[str, Any]:
    """The JSON form of a tensor map: data as base64."""
    recs = list(records.values()) if isinstance(records, dict) else records
    return {
        r.name: {"dtype": r.dtype, "shape": list(r.shape), "data": base64.b64encode(r.data).decode()}
        for r in recs
    }


def json_body(records: dict[str, TensorRecord] | list[TensorRecord], **fields: Any) -> bytes:
    """A JSON tensor payload with extra top-level fields."""
    return json.dumps({"tensors": json_tensors(records), **fields}).encode()


def blob_files(root: Path) -> set[str]:
    """Every file under the blob folder, temp files included."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Principal:
    """A principal the test created, with its auth header."""

    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """Its Authorization header."""
        return bearer(self.token)


@dataclass(frozen=True)
class Announced:
    """One report as the API announced it (in an `UpdatesReceived` or `TestReportsReceived`)."""

    training_id: UUID
    round: int
    client_id: UUID
    num_examples: int
    update_id: UUID | None = None


@dataclass
class Fedhub:
    """The API under test plus direct access to its runtime (database, blobs, bus)."""

    http: httpx.AsyncClient
    runtime: Runtime
    admin: Principal

    @property
    def bus(self) -> RecordingBus:
        """The spy bus."""
        assert isinstance(self.runtime.bus, RecordingBus)
        return self.runtime.bus

    @property
    def blob_root(self) -> Path:
        """The blob folder."""
        return self.runtime.settings.blob_path

    async def principal(self, role: str = "client", name: str = "site") -> Principal:
        """Create a principal as the admin."""
        resp = await self.http.post(
            "/v1/principals", json={"name": name, "role": role}, headers=self.admin.headers
        )
        assert resp.status_code == 201, resp.text
        return Principal(id=resp.json()["id"], token=resp.json()["token"])

    async def upload_model(
        self, records: dict[str, TensorRecord] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Upload a model as the admin (msgpack) and return its JSON."""
        resp = await self.http.post(
            "/v1/models",
            content=msgpack_body(records or model_tensors(), **fields),
            headers={**self.admin.headers, "Content-Type": MSGPACK},
        )
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def create_training(self, model_id: str, clients: list[str], **fields: Any) -> dict[str, Any]:
        """Create a training as the admin and return its JSON."""
        body = {"model_id": model_id, "clients": clients, "aggregation": "fedavg", "rounds": 2, **fields}
        resp = await self.http.post("/v1/trainings", json=body, headers=self.admin.headers)
        assert resp.status_code == 201, resp.text
        return dict(resp.json())

    async def set_round(
        self,
        training_id: str,
        *,
        state: TrainingState = TrainingState.ONGOING,
        phase: RoundPhase | None = RoundPhase.COLLECTING,
        round: int = 1,
    ) -> None:
        """Move a training as the orchestrator would (the orchestrator is not part of these tests)."""
        async with self.runtime.uow() as uow:
            training = await uow.session.get(Training, UUID(training_id))
            assert training is not None
            training.state, training.phase, training.round = state, phase, round

    async def count(self, table: type[Any], **where: Any) -> int:
        """Rows of a table matching column == value filters."""
        async with self.runtime.uow() as uow:
            query = select(func.count()).select_from(table)
            for column, value in where.items():
                query = query.where(getattr(table, column) == value)
            return int(await uow.session.scalar(query) or 0)

    async def published(self, cls: type[M]) -> list[M]:
        """Every message of a type published so far, once per message id.

        Draining the outbox first means no committed message is missed; delivery is at-least-once (the
        relay's own pass and this drain may both publish a row), so repeats of an id count once.
        """
        await self.runtime.relay.drain()
        unique = {e.message_id: e for e in self.bus.published if e.type == cls.__name__}
        return [cast(M, decode_message(cls, e.body)) for e in unique.values()]

    async def announced_updates(self) -> list[Announced]:
        """Every update announced so far (`UpdatesReceived`, one entry per update)."""
        return [
            Announced(m.training_id, m.round, u.client_id, u.num_examples, u.update_id)
            for m in await self.published(UpdatesReceived)
            for u in m.updates
        ]

    async def announced_test_reports(self) -> list[Announced]:
        """Every test report announced so far (`TestReportsReceived`, one entry per report)."""
        return [
            Announced(m.training_id, m.round, r.client_id, r.num_examples)
            for m in await self.published(TestReportsReceived)
            for r in m.reports
        ]
