"""The aggregator's handlers: an `AggregateRound` job in, a `ModelAggregated` or `AggregationFailed` out.

The round itself runs without the database in one of two engines: `services.aggregator.small`
(numpy) when it `takes` the round (FedAvg or FedProx over a small model of float32, float16,
integer and bool tensors: decided from the base model's row), else `services.aggregator.engine`
(torch: `services.aggregator.pipeline` with every method, on the configured device), which
`LazyEngine` imports with the first round that needs it, so an aggregator (the embedded process
included) whose rounds are all small FedAvg never loads torch. Either engine stores the round's
tensors and hands back a `rounds.StoredRound`; this module persists it, in one transaction: the
model's row (with its method's `record` and the key of its server-state blob), its ensemble
members' rows, the rejected updates' reasons, the update blobs' deletion marks and the outgoing
event. Blobs (content-addressed) are written before that transaction.

Idempotency: a round's global model has an id derived from (training id, round) (`round_model_id`).
A job whose round already has its model row emits nothing and computes nothing: the first run wrote
its `ModelAggregated` to the outbox in the same transaction as that row, so it is published already
or will be. This also makes a redelivery of the same message cheap (the consumer claims the inbox
after the handler). Two deliveries racing past that check cannot both commit: the second insert
fails on the primary key, its transaction rolls back, and its retry finds the row.

Across pods: with `batch_size` set, a round with more updates becomes parts on the work queue
(`services.aggregator.split`): the `AggregateRound` handler writes the plan row and emits one
`AggregatePart` per part (message ids derived from (training, round, part)); each part handler
computes its batch's `Partial` or its shard's tensors, stores them under a key of its own, and in
one transaction inserts its part row and increments the plan's counter (a row lock on PostgreSQL);
the part that completes the count emits `CombineParts`, whose handler merges the parts and records
the round as a single job would. A part done twice has one effect (its row's primary key); a
worker dying mid-part leaves no row, so the redelivery does it.

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
import gc
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast
from uuid import UUID, uuid5

import structlog
from sqlalchemy import Table, bindparam, select, update

from services.aggregator.models import AggregationPart, AggregationPlan
from services.aggregator.rounds import JobRejected, Rejection, StoredRound, job_spec
from services.aggregator.settings import AggregatorSettings
from services.aggregator.small import run_small_round, takes
from services.aggregator.split import Split, plan_split
from shared.blobs import BlobStore
from shared.codec import decode_message, encode_message
from shared.db.models import ClientUpdate, Model, ModelMember, Training
from shared.db.uow import UnitOfWork
from shared.events import (
    AggregatePart,
    AggregateRound,
    AggregationFailed,
    CombineParts,
    Message,
    ModelAggregated,
    UpdateRef,
    utcnow,
)
from shared.messaging import Handler
from shared.metrics import REGISTRY

if TYPE_CHECKING:
    from services.aggregator.engine import TorchEngine

log = structlog.get_logger(component="aggregator")

STAGE_SECONDS = REGISTRY.histogram(
    "fedhub_aggregator_stage_seconds",
    "One recorded round's time per stage: read (update blobs), decode, validate, aggregate (the "
    "method, its result included), store (model and state blobs), commit (rows, event, commit)",
    ("stage",),
)

ROUNDS = REGISTRY.counter(
    "fedhub_aggregator_rounds_total",
    "Rounds recorded, by the engine that computed them: numpy (small FedAvg and FedProx) or torch",
    ("engine",),
)

_ROUND_MODEL_NAMESPACE = UUID("6f1d8a52-3c0e-4f4b-9a57-2b8e64c1d0a9")
_PART_NAMESPACE = UUID("1c0f3e8a-7b52-4d8e-9a1e-5f2b6c3d4e71")


def round_model_id(training_id: UUID, round_number: int) -> UUID:
    """The id of a training round's global model, the same for every delivery of its job."""
    return uuid5(_ROUND_MODEL_NAMESPACE, f"{training_id}/{round_number}")


__all__ = ["JobRejected", "build_handlers", "part_key", "part_message_id", "round_model_id"]


def part_message_id(training_id: UUID, round_number: int, part: int | None) -> UUID:
    """The message id of a split round's part (`part`) or of its combine job (None): one per round."""
    suffix = "combine" if part is None else f"part/{part}"
    return uuid5(_PART_NAMESPACE, f"{training_id}/{round_number}/{suffix}")


def part_key(training_id: UUID, round_number: int, part: int) -> str:
    """The blob key of a part's result: its own, so a part done twice writes the same key."""
    return f"part/{training_id}.{round_number}.{part}"


class LazyEngine:
    """The torch engine (`services.aggregator.engine`), imported and built when first asked for.

    An aggregator whose rounds all go to the numpy engine (`services.aggregator.small`) never
    imports torch: ~240 MiB of memory and ~2 s of start-up it does not pay. The first round that
    needs torch imports it in a worker thread (`get`): on the event loop the import would stop
    every other task of the process (the embedded server's API and streams too) for its ~2-3 s; in
    a thread the loop still runs, with pauses of a few hundred milliseconds at most.
    """

    def __init__(self, settings: AggregatorSettings) -> None:
        self._settings = settings
        self._engine: TorchEngine | None = None
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the torch engine was built (torch imported)."""
        return self._engine is not None

    def load(self) -> TorchEngine:
        """Build the engine now, on the calling thread (start-up: `DeviceUnavailable` at once)."""
        if self._engine is None:
            self._engine = self._build()
        return self._engine

    async def get(self) -> TorchEngine:
        """The engine, built once (in a worker thread) however many rounds ask at the same time."""
        if self._engine is None:
            async with self._lock:
                if self._engine is None:
                    self._engine = await asyncio.to_thread(self._build)
        return self._engine

    def _build(self) -> TorchEngine:
        from services.aggregator.engine import TorchEngine

        engine = TorchEngine(self._settings)
        if gc.get_freeze_count():
            # The process froze its start-up heap (`shared.runtime.freeze_startup_heap`): torch's
            # ~140k objects join it, or every full collection walks them (~0.09 s each here).
            gc.freeze()
        log.info("aggregator.torch_loaded", device=str(engine.device))
        return engine


def build_handlers(settings: AggregatorSettings, blobs: BlobStore) -> Mapping[type[Message], Handler]:
    """The aggregator's handler registry; its queue binds to exactly these message types."""
    engine = LazyEngine(settings)
    if settings.device == "cuda":
        engine.load()  # refuse a missing GPU at start, not at the first large round

    async def on_aggregate_round(job: AggregateRound, uow: UnitOfWork) -> None:
        """Aggregate the job's updates into a new global model, store it and announce it (or split it)."""
        with structlog.contextvars.bound_contextvars(
            job_id=str(job.job_id), training_id=str(job.training_id), round=job.round
        ):
            if await _round_model(uow, job.training_id, job.round) is not None:
                return
            split = await _split(job, uow, settings, engine)
            if split is not None:
                await _plan(job, split, uow)
                return
            try:
                stored = await _compute(job, uow, settings, engine, blobs)
            except JobRejected as exc:
                await _fail(uow, job, exc)
                return
            await record_round(job, stored, uow, blobs)

    async def on_aggregate_part(part: AggregatePart, uow: UnitOfWork) -> None:
        """Compute one part of a split round, record it, and emit the combine job after the last part."""
        job = part.round_job
        with structlog.contextvars.bound_contextvars(
            job_id=str(job.job_id), training_id=str(job.training_id), round=job.round, part=part.part
        ):
            if await _round_model(uow, job.training_id, job.round) is not None:
                return
            if await uow.session.get(AggregationPlan, (job.training_id, job.round)) is None:
                log.warning("aggregation.part_without_plan")
                return
            if await uow.session.get(AggregationPart, (job.training_id, job.round, part.part)) is not None:
                log.info("aggregation.part_already_done")
                return
            key = part_key(job.training_id, job.round, part.part)
            row = await (await engine.get()).compute_part(part, blobs, key)
            uow.session.add(row)
            await uow.session.flush()
            done, total = (
                await uow.session.execute(
                    update(AggregationPlan)
                    .where(AggregationPlan.training_id == job.training_id, AggregationPlan.round == job.round)
                    .values(parts_done=AggregationPlan.parts_done + 1)
                    .returning(AggregationPlan.parts_done, AggregationPlan.parts_total)
                    .execution_options(synchronize_session=False)
                )
            ).one()
            log.info("aggregation.part_done", parts_done=done, parts=total, failure=row.failure)
            if done == total:
                uow.emit(
                    CombineParts(
                        job_id=job.job_id, training_id=job.training_id, round=job.round, parts=total
                    ),
                    message_id=part_message_id(job.training_id, job.round, None),
                )

    async def on_combine_parts(command: CombineParts, uow: UnitOfWork) -> None:
        """Merge a split round's parts into its model and record it as a single job would."""
        with structlog.contextvars.bound_contextvars(
            job_id=str(command.job_id), training_id=str(command.training_id), round=command.round
        ):
            if await _round_model(uow, command.training_id, command.round) is not None:
                return
            plan = await uow.session.get(AggregationPlan, (command.training_id, command.round))
            if plan is None:
                log.warning("aggregation.combine_without_plan")
                return
            job = decode_message(AggregateRound, plan.job)
            assert isinstance(job, AggregateRound)  # written by on_aggregate_round
            parts = (
                await uow.session.scalars(
                    select(AggregationPart)
                    .where(AggregationPart.training_id == job.training_id, AggregationPart.round == job.round)
                    .order_by(AggregationPart.part)
                )
            ).all()
            keys = [p.blob_key for p in parts if p.blob_key is not None]
            uow.after_commit(functools.partial(_delete_blobs, blobs, keys))
            try:
                stored = await (await engine.get()).combine(job, plan.kind, parts, blobs)
            except JobRejected as exc:
                await _fail(uow, job, exc)
                return
            await record_round(job, stored, uow, blobs)

    return {
        AggregateRound: on_aggregate_round,
        AggregatePart: on_aggregate_part,
        CombineParts: on_combine_parts,
    }


async def _round_model(uow: UnitOfWork, training_id: UUID, round_number: int) -> UUID | None:
    """The round's model id when it is recorded already (the job then has nothing left to do)."""
    existing = await uow.session.scalar(
        select(Model.id).where(Model.training_id == training_id, Model.round == round_number)
    )
    if existing is not None:
        log.info("aggregation.already_done", model_id=str(existing))
    return existing


async def _fail(uow: UnitOfWork, job: AggregateRound, exc: JobRejected) -> None:
    log.warning("aggregation.failed", reason=exc.detail)
    await mark_rejected(uow, exc.rejected)
    uow.emit(
        AggregationFailed(job_id=job.job_id, training_id=job.training_id, round=job.round, reason=exc.detail)
    )


async def _compute(
    job: AggregateRound, uow: UnitOfWork, settings: AggregatorSettings, engine: LazyEngine, blobs: BlobStore
) -> StoredRound:
    """Compute and store the round with the numpy engine when it `takes` it, else with torch's."""
    spec = job_spec(job)
    base = (
        await uow.session.execute(select(Model.spec, Model.size_bytes).where(Model.id == job.base_model_id))
    ).one_or_none()
    if base is not None and takes(
        job,
        spec,
        {name: (dtype, tuple(shape)) for name, (dtype, shape) in base.spec.items()},
        base.size_bytes,
        settings.small_round_bytes,
    ):
        return await run_small_round(job, spec, blobs)
    return await (await engine.get()).run_round(job, blobs)


async def _split(
    job: AggregateRound, uow: UnitOfWork, settings: AggregatorSettings, engine: LazyEngine
) -> Split | None:
    """How the round splits under the settings, or None for one job (a bad job fails as one job)."""
    if settings.batch_size is None or len(job.updates) <= settings.batch_size:
        return None
    try:
        spec = job_spec(job)
    except JobRejected:
        return None
    method_cls = (await engine.get()).method_class(spec.method)
    if method_cls is None:
        return None
    base_spec = None
    if method_cls.shardable:
        base = await uow.session.get(Model, job.base_model_id)
        if base is not None:
            base_spec = {name: list(shape) for name, (_, shape) in base.spec.items()}
    return plan_split(
        job, method_cls, spec, base_spec, batch_size=settings.batch_size, shards=settings.shards
    )


async def _plan(job: AggregateRound, split: Split, uow: UnitOfWork) -> None:
    """Record the plan and emit its parts, in one transaction (a second plan fails on the key)."""
    if await uow.session.get(AggregationPlan, (job.training_id, job.round)) is not None:
        log.info("aggregation.already_split")
        return
    uow.session.add(
        AggregationPlan(
            training_id=job.training_id,
            round=job.round,
            job_id=job.job_id,
            job=encode_message(job),
            kind=split.kind,
            parts_total=len(split.parts),
            parts_done=0,
        )
    )
    for part in split.parts:
        uow.emit(part, message_id=part_message_id(job.training_id, job.round, part.part))
    log.info("aggregation.split", kind=split.kind, parts=len(split.parts), num_updates=len(job.updates))


async def record_round(job: AggregateRound, stored: StoredRound, uow: UnitOfWork, blobs: BlobStore) -> None:
    """Record a stored round: its rows, rejections, deletion marks and event, in the unit of work's
    transaction."""
    rows_started = time.perf_counter()
    seconds = dict(stored.seconds)

    def observe() -> None:
        seconds["commit"] = time.perf_counter() - rows_started
        for stage, value in seconds.items():
            STAGE_SECONDS.observe(value, stage=stage)
        ROUNDS.inc(engine=stored.engine)

    uow.after_commit(observe)
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
            record=stored.record,
        )
    )
    if stored.members:
        # The members' foreign key needs the model row first.
        await uow.session.flush()
        refs: Sequence[UpdateRef | None] = (
            stored.accepted if len(stored.accepted) == len(stored.members) else [None] * len(stored.members)
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
    await mark_rejected(uow, stored.rejected)
    await _mark_deleted(job, blobs, uow)
    num_examples = sum(r.num_examples for r in stored.accepted)
    uow.emit(
        ModelAggregated(
            job_id=job.job_id,
            training_id=job.training_id,
            round=job.round,
            model_id=model_id,
            blob_key=model.key,
            num_updates=len(stored.accepted),
            num_examples=num_examples,
            num_rejected=len(stored.rejected),
            rejected=tuple(r.ref.update_id for r in stored.rejected),
        )
    )
    log.info(
        "round.aggregated",
        model_id=str(model_id),
        num_updates=len(stored.accepted),
        num_rejected=len(stored.rejected),
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


_UPDATES = cast(Table, ClientUpdate.__table__)
_MARK_DELETED = (
    update(_UPDATES)
    .where(_UPDATES.c.id == bindparam("update_id"), _UPDATES.c.blob_deleted_at.is_(None))
    .values(blob_deleted_at=bindparam("now"))
)
"""One row marked per parameter set, run as one executemany: an `IN` list of a round's update ids
(1,000 at B 1,000) is expanded and its ids converted in Python on every run."""


async def _mark_deleted(job: AggregateRound, blobs: BlobStore, uow: UnitOfWork) -> None:
    """Mark the job's update blobs deleted and delete them after the commit, when the training asks."""
    if not job.delete_updates_after:
        return
    now = utcnow()
    await uow.session.execute(_MARK_DELETED, [{"update_id": r.update_id, "now": now} for r in job.updates])
    uow.after_commit(functools.partial(_delete_blobs, blobs, [r.blob_key for r in job.updates]))


async def _delete_blobs(blobs: BlobStore, keys: Sequence[str]) -> None:
    """Delete update blobs after the commit that marked them deleted; best effort, never raises."""
    try:
        await blobs.delete_many(keys)
    except Exception as exc:
        # Raising here would fail a delivery whose effects are committed; the rows say deleted,
        # so a leftover file is garbage to sweep, not state.
        log.warning("update_blob.delete_failed", blobs=len(keys), error=f"{type(exc).__name__}: {exc}")
