"""The aggregator's handlers: an `AggregateRound` job in, a `ModelAggregated` or `AggregationFailed` out.

The round itself runs in `services.aggregator.pipeline` (no database); this module persists what it
gave, in one transaction: the model's row (with its method's `record` and the key of its server-state
blob), its ensemble members' rows, the rejected updates' reasons, the update blobs' deletion marks
and the outgoing event. Blobs (content-addressed) are written before that transaction.

Idempotency: a round's global model has an id derived from (training id, round) (`round_model_id`).
A job whose round already has its model row emits nothing and computes nothing: the first run wrote
its `ModelAggregated` to the outbox in the same transaction as that row, so it is published already
or will be. This also makes a redelivery of the same message cheap (the consumer claims the inbox
after the handler). Two deliveries racing past that check cannot both commit: the second insert
fails on the primary key, its transaction rolls back, and its retry finds the row.

The handler touches the database only for that check (a read) and at the end, so the long part
holds no write lock (SQLite). Failures: a single update that cannot be used (missing or undecodable
blob, wrong tensors, non-finite values, too large a norm) is rejected and left out; what no retry
can fix for the whole round (unknown method, missing base model, no update accepted) becomes
`AggregationFailed` with the reason; anything else (database or blob store unavailable) raises, so
the bus retries the job.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid5

import structlog
import torch
from sqlalchemy import select, update

from services.aggregator.pipeline import JobRejected, Rejection, RoundOutcome, aggregate_round
from services.aggregator.settings import AggregatorSettings, resolve_device
from shared.blobs import BlobStore, content_key
from shared.codec import encode_tensors
from shared.db.models import ClientUpdate, Model, ModelMember, Training
from shared.db.uow import UnitOfWork
from shared.events import AggregateRound, AggregationFailed, Message, ModelAggregated, UpdateRef, utcnow
from shared.messaging import Handler
from shared.tensors import state_dict_to_records

log = structlog.get_logger(component="aggregator")

_ROUND_MODEL_NAMESPACE = UUID("6f1d8a52-3c0e-4f4b-9a57-2b8e64c1d0a9")


def round_model_id(training_id: UUID, round_number: int) -> UUID:
    """The id of a training round's global model, the same for every delivery of its job."""
    return uuid5(_ROUND_MODEL_NAMESPACE, f"{training_id}/{round_number}")


__all__ = ["JobRejected", "build_handlers", "round_model_id"]


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A tensor blob written to the store: its content key, digest, size and spec."""

    key: str
    digest: str
    size: int
    spec: dict[str, list[Any]]


@dataclass(frozen=True, slots=True)
class _Stored:
    model: StoredBlob
    state: StoredBlob | None
    members: list[StoredBlob]


def _encode(tensors: Mapping[str, torch.Tensor]) -> tuple[bytes, StoredBlob]:
    records = state_dict_to_records(tensors)
    data = encode_tensors(records)
    key, digest = content_key(data)
    spec = {r.name: [r.dtype, list(r.shape)] for r in records}
    return data, StoredBlob(key=key, digest=digest, size=len(data), spec=spec)


async def put_tensors(blobs: BlobStore, tensors: Mapping[str, torch.Tensor]) -> StoredBlob:
    """Encode a state dict (off the event loop) and store it under its content address."""
    data, blob = await asyncio.to_thread(_encode, tensors)
    # Written before the commit: if the transaction rolls back, the blob is an orphan under its own
    # content address, which the retry rewrites (a no-op) rather than duplicates.
    await blobs.put(blob.key, data)
    return blob


def build_handlers(settings: AggregatorSettings, blobs: BlobStore) -> Mapping[type[Message], Handler]:
    """The aggregator's handler registry; its queue binds to exactly these message types."""
    device = resolve_device(settings.device)

    async def on_aggregate_round(job: AggregateRound, uow: UnitOfWork) -> None:
        """Aggregate the job's updates into a new global model, store it, and announce it."""
        with structlog.contextvars.bound_contextvars(
            job_id=str(job.job_id), training_id=str(job.training_id), round=job.round
        ):
            existing = await uow.session.scalar(
                select(Model.id).where(Model.training_id == job.training_id, Model.round == job.round)
            )
            if existing is not None:
                log.info("aggregation.already_done", model_id=str(existing))
                return
            try:
                outcome = await aggregate_round(job, blobs, device)
            except JobRejected as exc:
                log.warning("aggregation.failed", reason=exc.detail)
                await mark_rejected(uow, exc.rejected)
                uow.emit(
                    AggregationFailed(
                        job_id=job.job_id, training_id=job.training_id, round=job.round, reason=exc.detail
                    )
                )
                return
            await record_round(job, outcome, blobs, uow)

    return {AggregateRound: on_aggregate_round}


async def store(outcome: RoundOutcome, blobs: BlobStore) -> _Stored:
    """Store the round's model, server state and members (before the transaction)."""
    aggregate = outcome.aggregate
    model = await put_tensors(blobs, aggregate.model)
    state = await put_tensors(blobs, aggregate.state) if aggregate.state else None
    members = [await put_tensors(blobs, member) for member in aggregate.members]
    return _Stored(model=model, state=state, members=members)


async def record_round(job: AggregateRound, outcome: RoundOutcome, blobs: BlobStore, uow: UnitOfWork) -> None:
    """Store the round's blobs, then its rows, rejections, deletion marks and event in one transaction."""
    stored = await store(outcome, blobs)
    owner_id = await uow.session.scalar(select(Training.owner_id).where(Training.id == job.training_id))
    model_id = round_model_id(job.training_id, job.round)
    model = stored.model
    uow.session.add(
        Model(
            id=model_id,
            name=f"round-{job.round}",
            owner_id=owner_id,
            blob_key=model.key,
            digest=model.digest,
            size_bytes=model.size,
            spec=model.spec,
            training_id=job.training_id,
            round=job.round,
            state_blob_key=stored.state.key if stored.state is not None else None,
            record=outcome.aggregate.record,
        )
    )
    if stored.members:
        # The members' foreign key needs the model row first.
        await uow.session.flush()
        refs: Sequence[UpdateRef | None] = (
            outcome.accepted if len(outcome.accepted) == len(stored.members) else [None] * len(stored.members)
        )
        uow.session.add_all(
            ModelMember(
                model_id=model_id,
                index=i,
                blob_key=m.key,
                digest=m.digest,
                size_bytes=m.size,
                update_id=ref.update_id if ref is not None else None,
                client_id=ref.client_id if ref is not None else None,
            )
            for i, (m, ref) in enumerate(zip(stored.members, refs, strict=True))
        )
    await mark_rejected(uow, outcome.rejected)
    await _mark_deleted(job, blobs, uow)
    num_examples = sum(r.num_examples for r in outcome.accepted)
    uow.emit(
        ModelAggregated(
            job_id=job.job_id,
            training_id=job.training_id,
            round=job.round,
            model_id=model_id,
            blob_key=model.key,
            num_updates=len(outcome.accepted),
            num_examples=num_examples,
            num_rejected=len(outcome.rejected),
            rejected=tuple(r.ref.update_id for r in outcome.rejected),
        )
    )
    log.info(
        "round.aggregated",
        model_id=str(model_id),
        num_updates=len(outcome.accepted),
        num_rejected=len(outcome.rejected),
        num_examples=num_examples,
        num_members=len(stored.members),
        size_bytes=model.size,
    )


async def mark_rejected(uow: UnitOfWork, rejected: Sequence[Rejection]) -> None:
    """Keep each rejected update's reason on its row."""
    for r in rejected:
        await uow.session.execute(
            update(ClientUpdate).where(ClientUpdate.id == r.ref.update_id).values(rejected_reason=r.reason)
        )


async def _mark_deleted(job: AggregateRound, blobs: BlobStore, uow: UnitOfWork) -> None:
    """Mark the job's update blobs deleted and delete them after the commit, when the training asks."""
    if not job.delete_updates_after:
        return
    await uow.session.execute(
        update(ClientUpdate)
        .where(
            ClientUpdate.id.in_([r.update_id for r in job.updates]),
            ClientUpdate.blob_deleted_at.is_(None),
        )
        .values(blob_deleted_at=utcnow())
    )
    uow.after_commit(functools.partial(_delete_blobs, blobs, [r.blob_key for r in job.updates]))


async def _delete_blobs(blobs: BlobStore, keys: Sequence[str]) -> None:
    """Delete update blobs after the commit that marked them deleted; best effort, never raises."""
    for key in keys:
        try:
            await blobs.delete(key)
        except Exception as exc:
            # Raising here would fail a delivery whose effects are committed; the row says deleted,
            # so a leftover file is garbage to sweep, not state.
            log.warning("update_blob.delete_failed", blob_key=key, error=f"{type(exc).__name__}: {exc}")
