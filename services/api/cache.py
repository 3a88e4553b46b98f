"""What the API reads on every client request and never changes once written, kept in memory.

* Model rows: a model (blob key, spec, training) is never updated once committed.
* A training's participants: fixed when the training is created (no API changes them).
* Model blobs: content-addressed (`sha256/<hex>`), so a key's bytes never change; every client of
  a round downloads the same global model.

Each is a bounded LRU; an entry is only ever a fact that was committed, so the cache needs no
invalidation and stays right across API replicas.

One entry may be out of date: the last view of a training that a report read (`ReportedTraining`:
its state, phase, round and model). A report trusts it only while it says the report's round is open
in the report's phase; the conditional insert that records the report checks that again in the
database, and a report refused there reads the training afresh to answer. Any other answer (closed,
another round) is read afresh before it is given. So a round's 1,000 uploads read their training
once, not 1,000 times.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.blobs import BlobStore
from shared.coalesce import NextReads
from shared.db.models import Model, Participant
from shared.enums import RoundPhase, TrainingState
from shared.lru import Lru
from shared.metrics import REGISTRY

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CACHE_LOOKUPS = REGISTRY.counter(
    "fedhub_api_cache_lookups_total",
    "The API's caches of immutable rows and blobs: hits and misses",
    ("cache", "result"),
)


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """The immutable part of a model row that requests need."""

    id: UUID
    blob_key: str
    training_id: UUID | None
    spec: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ReportedTraining:
    """What a client's report (update or test metrics) needs of its training, read as one row."""

    id: UUID
    state: TrainingState
    phase: RoundPhase | None
    round: int
    current_model_id: UUID
    exclude_vars: str | None

    def is_open(self, round_: int, phase: RoundPhase) -> bool:
        """Whether this view says `round_` takes reports of `phase`."""
        return self.state == TrainingState.ONGOING and self.phase == phase and self.round == round_


class ApiCache:
    """The API process's caches of immutable rows and blobs (see the module doc)."""

    def __init__(
        self,
        *,
        models: int = 4096,
        trainings: int = 1024,
        blob_bytes: int = 16 * 1024 * 1024,
        largest_blob: int = 2 * 1024 * 1024,
    ) -> None:
        self._models: Lru[UUID, ModelFacts] = Lru(models)
        self._participants: Lru[UUID, frozenset[UUID]] = Lru(trainings)
        self._reported: Lru[UUID, ReportedTraining] = Lru(trainings)
        self._reported_reads: NextReads[ReportedTraining | None] = NextReads()
        self._blobs: Lru[str, bytes] = Lru(blob_bytes, weigh=len)
        self.largest_blob = largest_blob

    async def model(self, session: AsyncSession, model_id: UUID) -> ModelFacts | None:
        """A model's immutable facts; None when no such model is committed."""
        return await _cached(self._models, "model", model_id, lambda: _load_model(session, model_id))

    async def participants(self, session: AsyncSession, training_id: UUID) -> frozenset[UUID]:
        """The clients of a training (empty when there is no such training)."""
        found = await _cached(
            self._participants, "participants", training_id, lambda: _load_participants(session, training_id)
        )
        return found or frozenset()

    def reported_training(self, training_id: UUID) -> ReportedTraining | None:
        """The last view of the training a report read; possibly out of date (see the module doc)."""
        view = self._reported.get(training_id)
        CACHE_LOOKUPS.inc(cache="reported_training", result="miss" if view is None else "hit")
        return view

    async def read_reported_training(
        self, training_id: UUID, load: Callable[[], Awaitable[ReportedTraining | None]]
    ) -> ReportedTraining | None:
        """The training read afresh by `load` (in a session of its own): a read that started after
        this call, shared with the callers asking at the same time (`NextReads`: when a round opens,
        the uploads arriving together read it twice, not once each), and remembered."""
        view = await self._reported_reads.read(training_id, load)
        CACHE_LOOKUPS.inc(cache="reported_training", result="read")
        if view is not None:
            self._reported.put(training_id, view)
        return view

    async def model_blob(self, blobs: BlobStore, key: str) -> bytes:
        """A model blob's bytes; content-addressed ones up to `largest_blob` bytes are kept."""
        data = self._blobs.get(key)
        if data is not None:
            CACHE_LOOKUPS.inc(cache="blob", result="hit")
            return data
        data = await blobs.get(key)
        CACHE_LOOKUPS.inc(cache="blob", result="miss")
        if key.startswith("sha256/") and len(data) <= self.largest_blob:
            self._blobs.put(key, data)
        return data


async def _cached(lru: Lru[K, V], name: str, key: K, load: Callable[[], Awaitable[V | None]]) -> V | None:
    value = lru.get(key)
    if value is not None:
        CACHE_LOOKUPS.inc(cache=name, result="hit")
        return value
    CACHE_LOOKUPS.inc(cache=name, result="miss")
    value = await load()
    if value:  # only what was found: a training or model created later must not hit a stale miss
        lru.put(key, value)
    return value


async def _load_model(session: AsyncSession, model_id: UUID) -> ModelFacts | None:
    row = (
        await session.execute(
            select(Model.id, Model.blob_key, Model.training_id, Model.spec).where(Model.id == model_id)
        )
    ).one_or_none()
    if row is None:
        return None
    return ModelFacts(id=row.id, blob_key=row.blob_key, training_id=row.training_id, spec=row.spec)


async def _load_participants(session: AsyncSession, training_id: UUID) -> frozenset[UUID]:
    rows = await session.scalars(select(Participant.client_id).where(Participant.training_id == training_id))
    return frozenset(rows.all())
