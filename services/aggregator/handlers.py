"""The aggregator's handlers: an `AggregateRound` job in, a `ModelAggregated` or `AggregationFailed` out.

Idempotency: a round's global model has an id derived from (training id, round) (`round_model_id`).
A job whose round already has its model row emits nothing and computes nothing: the first run wrote
its `ModelAggregated` to the outbox in the same transaction as that row, so it is published already
or will be. This also makes a redelivery of the same message cheap (the consumer claims the inbox
after the handler). Two deliveries racing past that check cannot both commit: the second insert
fails on the primary key, its transaction rolls back, and its retry finds the row.

The handler touches the database only for that check (a read) and at the end, so the long part
holds no write lock (SQLite). Failures: what no retry can fix (unknown method, a missing or
undecodable blob, an update that does not fit the base model) becomes `AggregationFailed` with a
reason naming the update; anything else (database or blob store unavailable) raises, so the bus
retries the job.
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

from services.aggregator.methods import METHODS, NothingToAggregate, StreamingMethod
from services.aggregator.settings import AggregatorSettings, resolve_device
from shared.blobs import BlobStore, content_key
from shared.blobs.base import BlobNotFound
from shared.codec import decode_tensors, encode_tensors
from shared.db.models import ClientUpdate, Model, Training
from shared.db.uow import UnitOfWork
from shared.errors import FedhubError, NonFiniteValues
from shared.events import (
    AggregateRound,
    AggregationFailed,
    Message,
    ModelAggregated,
    UpdateRef,
    utcnow,
)
from shared.messaging import Handler
from shared.tensors import first_non_finite, records_to_state_dict, state_dict_to_records

log = structlog.get_logger(component="aggregator")

_ROUND_MODEL_NAMESPACE = UUID("6f1d8a52-3c0e-4f4b-9a57-2b8e64c1d0a9")


def round_model_id(training_id: UUID, round_number: int) -> UUID:
    """The id of a training round's global model, the same for every delivery of its job."""
    return uuid5(_ROUND_MODEL_NAMESPACE, f"{training_id}/{round_number}")


class JobRejected(FedhubError):
    """An aggregation job that cannot succeed however often it is retried; `detail` is the reason."""

    status_code = 422


@dataclass(frozen=True, slots=True)
class _Encoded:
    data: bytes
    spec: dict[str, list[Any]]


def build_handlers(settings: AggregatorSettings, blobs: BlobStore) -> Mapping[type[Message], Handler]:
    """The aggregator's handler registry; its queue binds to exactly these message types."""
    device = resolve_device(settings.device)

    async def on_aggregate_round(job: AggregateRound, uow: UnitOfWork) -> None:
        """Average the job's updates into a new global model, store it, and announce it."""
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
                encoded = await _aggregate(job, blobs, device)
            except JobRejected as exc:
                log.warning("aggregation.failed", reason=exc.detail)
                uow.emit(
                    AggregationFailed(
                        job_id=job.job_id, training_id=job.training_id, round=job.round, reason=exc.detail
                    )
                )
                return
            await _record(job, encoded, blobs, uow)

    return {AggregateRound: on_aggregate_round}


async def _aggregate(job: AggregateRound, blobs: BlobStore, device: torch.device) -> _Encoded:
    """Stream every update of `job` through its method; return the new model, encoded."""
    method_cls = METHODS.get(job.method)
    if method_cls is None:
        raise JobRejected(f"unknown aggregation method {job.method!r} (known: {', '.join(sorted(METHODS))})")
    if not job.updates:
        raise JobRejected("the job lists no updates")
    base_bytes = await _read(blobs, job.base_blob_key, f"base model {job.base_model_id}")
    method = await asyncio.to_thread(_start, method_cls, base_bytes, job.base_model_id, device)
    del base_bytes
    for ref in job.updates:
        data = await _read(blobs, ref.blob_key, f"update {ref.update_id} of client {ref.client_id}")
        await asyncio.to_thread(_fold, method, data, ref)
        # One update's bytes at a time: dropped before the next read.
        del data
    return await asyncio.to_thread(_finish, method)


async def _read(blobs: BlobStore, key: str, what: str) -> bytes:
    try:
        return await blobs.get(key)
    except BlobNotFound:
        raise JobRejected(f"{what}: blob {key!r} does not exist") from None
    except ValueError as exc:  # a key the store refuses outright
        raise JobRejected(f"{what}: {exc}") from None


def _start(
    method_cls: type[StreamingMethod], data: bytes, model_id: UUID, device: torch.device
) -> StreamingMethod:
    try:
        base = records_to_state_dict(decode_tensors(data))
    except FedhubError as exc:
        raise JobRejected(f"base model {model_id}: {exc.name}: {exc.detail}") from exc
    return method_cls(base, device)


def _fold(method: StreamingMethod, data: bytes, ref: UpdateRef) -> None:
    try:
        records = decode_tensors(data)
        # The API checked this at upload; checked again because one NaN would poison the whole model.
        bad = first_non_finite(records)
        if bad is not None:
            raise NonFiniteValues(f"tensor {bad!r} holds NaN or Inf values")
        method.add(records_to_state_dict(records), float(ref.num_examples))
    except FedhubError as exc:
        reason = f"update {ref.update_id} of client {ref.client_id}: {exc.name}: {exc.detail}"
        raise JobRejected(reason) from exc


def _finish(method: StreamingMethod) -> _Encoded:
    try:
        averaged = method.result()
    except NothingToAggregate as exc:
        raise JobRejected(exc.detail) from exc
    records = state_dict_to_records(averaged)
    spec = {r.name: [r.dtype, list(r.shape)] for r in records}
    return _Encoded(data=encode_tensors(records), spec=spec)


async def _record(job: AggregateRound, encoded: _Encoded, blobs: BlobStore, uow: UnitOfWork) -> None:
    """Store the model's bytes; then its row, the updates' deletion marks and the event in one transaction."""
    key, digest = content_key(encoded.data)
    # Written before the commit: if the transaction rolls back, the blob is an orphan under its own
    # content address, which the retry rewrites (a no-op) rather than duplicates.
    await blobs.put(key, encoded.data)
    owner_id = await uow.session.scalar(select(Training.owner_id).where(Training.id == job.training_id))
    model_id = round_model_id(job.training_id, job.round)
    uow.session.add(
        Model(
            id=model_id,
            name=f"round-{job.round}",
            owner_id=owner_id,
            blob_key=key,
            digest=digest,
            size_bytes=len(encoded.data),
            spec=encoded.spec,
            training_id=job.training_id,
            round=job.round,
        )
    )
    if job.delete_updates_after:
        await uow.session.execute(
            update(ClientUpdate)
            .where(
                ClientUpdate.id.in_([r.update_id for r in job.updates]),
                ClientUpdate.blob_deleted_at.is_(None),
            )
            .values(blob_deleted_at=utcnow())
        )
        uow.after_commit(functools.partial(_delete_blobs, blobs, [r.blob_key for r in job.updates]))
    num_examples = sum(r.num_examples for r in job.updates)
    uow.emit(
        ModelAggregated(
            job_id=job.job_id,
            training_id=job.training_id,
            round=job.round,
            model_id=model_id,
            blob_key=key,
            num_updates=len(job.updates),
            num_examples=num_examples,
        )
    )
    log.info(
        "round.aggregated",
        model_id=str(model_id),
        num_updates=len(job.updates),
        num_examples=num_examples,
        size_bytes=len(encoded.data),
    )


async def _delete_blobs(blobs: BlobStore, keys: Sequence[str]) -> None:
    """Delete update blobs after the commit that marked them deleted; best effort, never raises."""
    for key in keys:
        try:
            await blobs.delete(key)
        except Exception as exc:
            # Raising here would fail a delivery whose effects are committed; the row says deleted,
            # so a leftover file is garbage to sweep, not state.
            log.warning("update_blob.delete_failed", blob_key=key, error=f"{type(exc).__name__}: {exc}")
