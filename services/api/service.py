"""What the API does, given the request's unit of work: rows, outbox messages and named errors."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, NoReturn, ParamSpec, TypeVar, cast
from uuid import UUID, uuid4, uuid5

import structlog
from sqlalchemy import Exists, Insert, Table, bindparam, exists, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.api.cache import ApiCache, ModelFacts, ReportedTraining
from services.api.errors import ValidationError
from services.api.reports import ReportGroups, Reports, recorded_or_not
from services.api.schemas import OFFLOAD_BYTES, TensorDocument, TrainingCreate
from services.api.uploads import (
    ExcludedTensors,
    Written,
    canonical_update,
    in_order,
    items_after,
    spool,
    unspool,
)
from shared.aggregation import AggregationSpec, excluded_by, parse_spec
from shared.auth import Caller, hash_token, new_token
from shared.blobs import BlobStore, content_key, update_key
from shared.codec import (
    StreamedField,
    StreamedTensors,
    TensorDocumentReader,
    TensorRecord,
    encode_tensors,
    parse_tensor_map,
)
from shared.db.base import dialect_insert
from shared.db.models import (
    ClientUpdate,
    Model,
    ModelMember,
    OutboxMessage,
    Participant,
    Principal,
    TestMetric,
    Training,
    TrainingRound,
)
from shared.db.uow import UnitOfWork, UnitOfWorkFactory
from shared.enums import Role, RoundPhase, TrainingState
from shared.errors import (
    IllegalTransition,
    MalformedPayload,
    NonFiniteValues,
    NotAParticipant,
    NotFound,
    RoundClosed,
)
from shared.events import (
    CancelTraining,
    ReceivedTestReport,
    ReceivedUpdate,
    StartTraining,
    TestReportsReceived,
    UpdatesReceived,
    utcnow,
)
from shared.tensors import TensorSpec, check_against_spec, first_non_finite
from shared.threads import off_loop

log = structlog.get_logger(component="api")

P = ParamSpec("P")
T = TypeVar("T")

_START_NAMESPACE = UUID("0b7e6f0e-2a43-4c1f-8d55-3f0f3d9b6c21")
_MAX_NAME = 200


# --- the request's unit of work -------------------------------------------------------------------


async def offload(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run CPU work on a payload of `size` bytes in a thread when it is large enough to stall the loop."""
    return await off_loop(size <= OFFLOAD_BYTES, fn, *args, **kwargs)


# --- principals -----------------------------------------------------------------------------------


async def create_principal(uow: UnitOfWork, name: str, role: Role) -> tuple[Principal, str]:
    """Create a client or actor; return it with its token (only the token's hash is stored)."""
    token = new_token()
    principal = Principal(id=uuid4(), name=name, role=role, token_hash=hash_token(token))
    uow.session.add(principal)
    await uow.session.flush()
    log.info("principal.created", principal_id=str(principal.id), role=role.value)
    return principal, token


# --- models ---------------------------------------------------------------------------------------


async def upload_model(uow: UnitOfWork, blobs: BlobStore, owner_id: UUID, doc: TensorDocument) -> Model:
    """Check an uploaded model, store its canonical encoding content-addressed and record it."""
    name = _model_name(doc.fields)
    records, data = await offload(doc.size, _canonical_model, doc)
    key, digest = content_key(data)
    if await blobs.put(key, data):
        uow.on_rollback(lambda: _drop_unreferenced_model_blob(uow.sessions, blobs, key))
    spec = {r.name: [r.dtype, list(r.shape)] for r in records}
    return await _record_model(uow, owner_id, name, key, digest, len(data), spec)


async def upload_streamed_model(
    uow: UnitOfWork, blobs: BlobStore, owner_id: UUID, reader: TensorDocumentReader
) -> Model:
    """Check a msgpack model as it streams in and store its canonical encoding, never holding it whole.

    The blob is content-addressed, so its key is known only at the end: the canonical bytes wait in a
    spool file (disk beyond a few MiB) while they are hashed, then stream into the store.
    """
    fields: dict[str, Any] = {}
    item = await reader.next_item()
    while isinstance(item, StreamedField):
        fields[item.name] = item.value
        item = await reader.next_item()
    if not isinstance(item, StreamedTensors):
        _model_name(fields)
        parse_tensor_map(None)  # raises: the body has no tensor map
        raise AssertionError("unreachable")
    written = Written(fields)
    spec: dict[str, list[Any]] = {}
    async with aclosing(written.count(in_order(items_after(reader), item.count, fields, spec))) as chunks:
        spooled = await spool(chunks)
    try:
        name = _model_name(fields)
    except MalformedPayload:
        spooled.close()
        raise
    key = f"sha256/{written.digest}"
    try:
        created = await blobs.put_stream(key, unspool(spooled))
    finally:
        spooled.close()
    if created:
        uow.on_rollback(lambda: _drop_unreferenced_model_blob(uow.sessions, blobs, key))
    return await _record_model(uow, owner_id, name, key, written.digest, written.size, spec)


def _model_name(fields: Mapping[str, Any]) -> str:
    name = fields.get("name") or ""
    if not isinstance(name, str) or len(name) > _MAX_NAME:
        raise MalformedPayload(f"'name' must be a string of at most {_MAX_NAME} characters")
    return name


async def _record_model(
    uow: UnitOfWork,
    owner_id: UUID,
    name: str,
    key: str,
    digest: str,
    size: int,
    spec: dict[str, list[Any]],
) -> Model:
    model = Model(
        id=uuid4(),
        name=name,
        owner_id=owner_id,
        blob_key=key,
        digest=digest,
        size_bytes=size,
        spec=spec,
        training_id=None,
        round=None,
    )
    uow.session.add(model)
    await uow.session.flush()
    log.info("model.uploaded", model_id=str(model.id), digest=digest, size_bytes=size)
    return model


def _canonical_model(doc: TensorDocument) -> tuple[list[TensorRecord], bytes]:
    records = doc.records()
    bad = first_non_finite(records)
    if bad is not None:
        raise NonFiniteValues(f"tensor {bad!r} holds NaN or Inf values")
    return records, encode_tensors(records)


async def _drop_unreferenced_model_blob(
    sessions: async_sessionmaker[AsyncSession], blobs: BlobStore, key: str
) -> None:
    # Content-addressed: an identical upload (or an aggregator's output) may have committed a row
    # naming these bytes meanwhile.
    async with sessions() as session:
        for column in (Model.blob_key, Model.state_blob_key, ModelMember.blob_key):
            if await session.scalar(select(column).where(column == key).limit(1)) is not None:
                return
        await blobs.delete(key)


async def visible_model(session: AsyncSession, cache: ApiCache, model_id: UUID, principal: Caller) -> Model:
    """A model the caller may read: actors read any; clients those of trainings they take part in."""
    model = await session.get(Model, model_id)
    if model is None or not await _may_read_model(session, cache, model.id, model.training_id, principal):
        raise NotFound(f"model {model_id} does not exist")
    return model


async def _may_read_model(
    session: AsyncSession, cache: ApiCache, model_id: UUID, training_id: UUID | None, principal: Caller
) -> bool:
    if principal.role == Role.ACTOR:
        return True
    # A round's model, read by that training's clients: no query once its participants are known.
    if training_id is not None and principal.id in await cache.participants(session, training_id):
        return True
    related = [Training.initial_model_id == model_id, Training.current_model_id == model_id]
    if training_id is not None:
        related.append(Training.id == training_id)
    found = await session.scalar(
        select(Participant.training_id)
        .join(Training, Training.id == Participant.training_id)
        .where(Participant.client_id == principal.id, or_(*related))
        .limit(1)
    )
    return found is not None


async def model_weights(
    session: AsyncSession, blobs: BlobStore, cache: ApiCache, model_id: UUID, principal: Caller
) -> bytes:
    """The stored canonical msgpack bytes of a model the caller may read."""
    model = await cache.model(session, model_id)
    if model is None or not await _may_read_model(session, cache, model.id, model.training_id, principal):
        raise NotFound(f"model {model_id} does not exist")
    return await cache.model_blob(blobs, model.blob_key)


async def count_members(session: AsyncSession, model_id: UUID) -> int:
    """How many ensemble members a model has (0 for every other model)."""
    n = await session.scalar(
        select(func.count()).select_from(ModelMember).where(ModelMember.model_id == model_id)
    )
    return int(n or 0)


async def model_members(
    session: AsyncSession, cache: ApiCache, model_id: UUID, principal: Caller
) -> list[ModelMember]:
    """The members of a model the caller may read, in order (empty unless it is an ensemble)."""
    await visible_model(session, cache, model_id, principal)
    rows = await session.scalars(
        select(ModelMember).where(ModelMember.model_id == model_id).order_by(ModelMember.index)
    )
    return list(rows)


async def member_weights(
    session: AsyncSession, blobs: BlobStore, cache: ApiCache, model_id: UUID, index: int, principal: Caller
) -> bytes:
    """The stored canonical msgpack bytes of one member of a model the caller may read."""
    await visible_model(session, cache, model_id, principal)
    member = await session.get(ModelMember, (model_id, index))
    if member is None:
        raise NotFound(f"model {model_id} has no member {index}")
    return await blobs.get(member.blob_key)


# --- trainings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingView:
    """A training with its participants and who has reported for the current round."""

    training: Training
    participants: list[UUID]
    uploaded: list[UUID]
    tested: list[UUID]


@dataclass(frozen=True, slots=True)
class Rejection:
    """An update the aggregator left out, and why."""

    update_id: UUID
    client_id: UUID
    reason: str


@dataclass(frozen=True, slots=True)
class RoundView:
    """One round's row with the example-weighted means of its clients' metrics and its rejections."""

    row: TrainingRound
    train_metrics: dict[str, float]
    test_metrics: dict[str, float]
    rejected: list[Rejection] = field(default_factory=list)


async def create_training(uow: UnitOfWork, owner_id: UUID, body: TrainingCreate) -> TrainingView:
    """Create an INITIAL training over an existing model and existing clients."""
    session = uow.session
    clients = list(body.clients)
    repeated = sorted(str(c) for c, n in Counter(clients).items() if n > 1)
    if repeated:
        raise ValidationError(f"clients listed more than once: {', '.join(repeated)}")
    min_clients = len(clients) if body.min_clients is None else body.min_clients
    if min_clients > len(clients):
        raise ValidationError(f"min_clients {min_clients} exceeds the {len(clients)} clients listed")
    spec = aggregation_spec(body)
    model = await session.get(Model, body.model_id)
    if model is None:
        raise NotFound(f"model {body.model_id} does not exist")
    if spec.exclude_vars is not None and all(spec.excluded(name) for name in model.spec):
        raise ValidationError(
            f"exclude_vars {spec.exclude_vars!r} matches every tensor of model {model.id}: nothing to train"
        )
    known = set(
        await session.scalars(
            select(Principal.id).where(Principal.id.in_(clients), Principal.role == Role.CLIENT)
        )
    )
    unknown = [str(c) for c in clients if c not in known]
    if unknown:
        raise NotFound(f"unknown client ids: {', '.join(unknown)}")
    training = Training(
        id=uuid4(),
        owner_id=owner_id,
        initial_model_id=body.model_id,
        current_model_id=body.model_id,
        aggregation=spec.method.value,
        aggregation_params=spec.typed_params().model_dump(mode="json"),
        update_kind=spec.update_kind.value,
        exclude_vars=spec.exclude_vars,
        max_update_norm=spec.max_update_norm,
        rounds=body.rounds,
        min_clients=min_clients,
        round_timeout_s=body.round_timeout_s,
        skip_model_tests=body.skip_model_tests,
        model_test_after_each_round=body.model_test_after_each_round,
        delete_local_models_after_aggregation=body.delete_local_models_after_aggregation,
        state=TrainingState.INITIAL,
        phase=None,
        round=0,
    )
    session.add(training)
    # No ORM relationship orders these inserts, and the participants' foreign key needs the training.
    await session.flush()
    # One Core executemany, not an ORM object per participant: at 1,000 clients those objects and
    # their flush were ~2 MiB of the API's peak memory.
    await session.execute(
        insert(_PARTICIPANTS), [{"training_id": training.id, "client_id": c} for c in clients]
    )
    log.info("training.created", training_id=str(training.id), clients=len(clients), rounds=body.rounds)
    return TrainingView(training, participants=sorted(clients, key=str), uploaded=[], tested=[])


def aggregation_spec(body: TrainingCreate) -> AggregationSpec:
    """The training's aggregation, checked against `shared.aggregation`; `ValidationError` names the fault."""
    try:
        return parse_spec(
            method=body.aggregation,
            params=dict(body.aggregation_params or {}),
            update_kind=body.update_kind,
            exclude_vars=body.exclude_vars,
            max_update_norm=body.max_update_norm,
        )
    except MalformedPayload as exc:
        raise ValidationError(exc.detail) from None


async def visible_training(
    session: AsyncSession, cache: ApiCache, training_id: UUID, principal: Caller
) -> Training:
    """A training its owner or one of its participants asks about; anyone else gets `NotFound`."""
    training = await session.get(Training, training_id)
    if training is not None and (
        training.owner_id == principal.id or principal.id in await cache.participants(session, training_id)
    ):
        return training
    raise NotFound(f"training {training_id} does not exist")


async def training_view(
    session: AsyncSession, training: Training, viewer: UUID | None = None
) -> TrainingView:
    """The training with its participants and the current round's reporters.

    For its owner (or with no `viewer`) the whole lists, one query each. For a participant they
    hold the participant alone: a client learns neither who else takes part nor who has reported
    (as in NVFlare, a site does not see the others), and its read costs one point query whatever
    the number of clients (at 1,000 clients each catch-up read listed 1,000 ids).
    """
    if viewer is not None and viewer != training.owner_id:
        uploaded, tested = (await session.execute(_REPORTED_BY, _reported_by(training, viewer))).one()
        return TrainingView(
            training,
            participants=[viewer],
            uploaded=[viewer] if uploaded else [],
            tested=[viewer] if tested else [],
        )
    participants = await session.scalars(
        select(Participant.client_id).where(Participant.training_id == training.id)
    )
    uploaded_by = await session.scalars(
        select(ClientUpdate.client_id).where(
            ClientUpdate.training_id == training.id, ClientUpdate.round == training.round
        )
    )
    tested_by = await session.scalars(
        select(TestMetric.client_id).where(
            TestMetric.training_id == training.id, TestMetric.round == training.round
        )
    )
    return TrainingView(
        training,
        participants=sorted(participants, key=str),
        uploaded=sorted(uploaded_by, key=str),
        tested=sorted(tested_by, key=str),
    )


def _reported(entity: type[ClientUpdate | TestMetric]) -> Exists:
    table = cast(Table, entity.__table__)
    return exists().where(
        table.c.training_id == bindparam("training_id"),
        table.c.round == bindparam("round"),
        table.c.client_id == bindparam("client_id"),
    )


_REPORTED_BY = select(_reported(ClientUpdate), _reported(TestMetric))
"""Whether one client has uploaded and tested in a round: two index lookups in one statement."""


def _reported_by(training: Training, client_id: UUID) -> dict[str, Any]:
    return {"training_id": training.id, "round": training.round, "client_id": client_id}


def start_message_id(training_id: UUID) -> UUID:
    """The message id of a training's one `StartTraining`: consumers' inboxes drop any repeat."""
    return uuid5(_START_NAMESPACE, str(training_id))


async def request_start(uow: UnitOfWork, training_id: UUID, actor: Caller) -> TrainingView:
    """Ask the orchestrator to start an INITIAL training; only its owner may."""
    session = uow.session
    training = await session.get(Training, training_id)
    if training is None or training.owner_id != actor.id:
        raise NotFound(f"training {training_id} does not exist")
    if training.state != TrainingState.INITIAL:
        raise IllegalTransition(
            f"training {training_id} is {training.state.value}; only an INITIAL training can be started"
        )
    message_id = start_message_id(training_id)
    pending = await session.scalar(select(OutboxMessage.id).where(OutboxMessage.message_id == message_id))
    if pending is not None:
        raise IllegalTransition(f"training {training_id}: a start was already requested and is pending")
    uow.emit(StartTraining(training_id=training_id, requested_by=actor.id), message_id=message_id)
    log.info("training.start_requested", training_id=str(training_id), requested_by=str(actor.id))
    return await training_view(session, training)


_CANCEL_NAMESPACE = UUID("5c1d7a52-8e0b-4f63-9a7e-2d4b6f1c8e93")


def cancel_message_id(training_id: UUID) -> UUID:
    """The message id of a training's one `CancelTraining`: consumers' inboxes drop any repeat."""
    return uuid5(_CANCEL_NAMESPACE, str(training_id))


async def request_cancel(uow: UnitOfWork, training_id: UUID, actor: Caller) -> tuple[TrainingView, bool]:
    """Ask the orchestrator to cancel an INITIAL or ONGOING training; only its owner may.

    Idempotent: an already CANCELLED training is answered as it is (False: nothing requested), and
    while a cancel is pending a repeat adds no second message. A COMPLETED or FAILED training is
    `IllegalTransition` naming its state.
    """
    session = uow.session
    training = await session.get(Training, training_id)
    if training is None or training.owner_id != actor.id:
        raise NotFound(f"training {training_id} does not exist")
    if training.state == TrainingState.CANCELLED:
        return await training_view(session, training), False
    if training.state not in (TrainingState.INITIAL, TrainingState.ONGOING):
        raise IllegalTransition(
            f"training {training_id} is {training.state.value}; "
            "only an INITIAL or ONGOING training can be cancelled"
        )
    message_id = cancel_message_id(training_id)
    pending = await session.scalar(select(OutboxMessage.id).where(OutboxMessage.message_id == message_id))
    if pending is None:
        uow.emit(CancelTraining(training_id=training_id, requested_by=actor.id), message_id=message_id)
    log.info(
        "training.cancel_requested",
        training_id=str(training_id),
        requested_by=str(actor.id),
        repeat=pending is not None,
    )
    return await training_view(session, training), True


async def round_summaries(session: AsyncSession, training: Training) -> list[RoundView]:
    """Every round of a training: train metrics of its aggregated updates, test metrics, rejections."""
    rows = await session.scalars(
        select(TrainingRound).where(TrainingRound.training_id == training.id).order_by(TrainingRound.round)
    )
    train = await session.execute(
        select(ClientUpdate.round, ClientUpdate.num_examples, ClientUpdate.metrics).where(
            ClientUpdate.training_id == training.id, ClientUpdate.rejected_reason.is_(None)
        )
    )
    rejected = await session.execute(
        select(ClientUpdate.round, ClientUpdate.id, ClientUpdate.client_id, ClientUpdate.rejected_reason)
        .where(ClientUpdate.training_id == training.id, ClientUpdate.rejected_reason.is_not(None))
        .order_by(ClientUpdate.client_id)
    )
    rejected_by_round: dict[int, list[Rejection]] = defaultdict(list)
    for round_, update_id, client_id, reason in rejected:
        rejected_by_round[round_].append(Rejection(update_id, client_id, str(reason)))
    test = await session.execute(
        select(TestMetric.round, TestMetric.num_examples, TestMetric.metrics).where(
            TestMetric.training_id == training.id
        )
    )
    train_by_round = _by_round(train)
    test_by_round = _by_round(test)
    return [
        RoundView(
            row,
            train_metrics=weighted_means(train_by_round.get(row.round, [])),
            test_metrics=weighted_means(test_by_round.get(row.round, [])),
            rejected=rejected_by_round.get(row.round, []),
        )
        for row in rows
    ]


def _by_round(rows: Iterable[Any]) -> dict[int, list[tuple[int, Mapping[str, Any]]]]:
    grouped: dict[int, list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
    for round_, num_examples, metrics in rows:
        grouped[round_].append((num_examples, metrics or {}))
    return grouped


def weighted_means(reports: Iterable[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """Per metric, the mean over reports weighted by their example counts.

    ``mean_k = sum_i n_i * m_ik / sum_i n_i`` over the reports that carry metric ``k``; when those
    reports count no examples at all, the plain mean.
    """
    weighted: dict[str, float] = defaultdict(float)
    weights: dict[str, int] = defaultdict(int)
    plain: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for n, metrics in reports:
        for key, value in metrics.items():
            if not _is_number(value):
                continue
            weighted[key] += n * value
            weights[key] += n
            plain[key] += value
            counts[key] += 1
    return {
        key: weighted[key] / weights[key] if weights[key] > 0 else plain[key] / counts[key]
        for key in sorted(counts)
    }


# --- updates and test metrics ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Receipt:
    """What a client's test report produced: whether it repeated an earlier one."""

    round: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class UpdateReceipt:
    """What an update upload produced: the update's id (the first one's, for a repeat)."""

    update_id: UUID
    round: int
    duplicate: bool


_TRAINING = cast(Table, Training.__table__)
_PARTICIPANTS = cast(Table, Participant.__table__)
_REPORTED = select(*(_TRAINING.c[f.name] for f in dataclasses.fields(ReportedTraining))).where(
    _TRAINING.c.id == bindparam("training_id")
)


async def participant_training(
    uow: UnitOfWork, cache: ApiCache, training_id: UUID, client_id: UUID, *, fresh: bool = True
) -> ReportedTraining:
    """The training a client reports to: it must exist and the client must take part in it.

    A Core select of the few columns a report reads (not the ORM entity: a per-request cost). With
    `fresh=False` the view an earlier report read may answer instead (`ApiCache.reported_training`);
    the caller then goes through `open_or_fresh` before it trusts what the view says of the round."""
    training = None if fresh else cache.reported_training(training_id)
    if training is None:
        training = await _read_reported(uow, cache, training_id)
    if client_id not in await cache.participants(uow.session, training_id):
        raise NotAParticipant(f"client {client_id} is not a participant of training {training_id}")
    return training


async def open_or_fresh(
    uow: UnitOfWork, cache: ApiCache, training: ReportedTraining, round_: int, phase: RoundPhase
) -> ReportedTraining:
    """`training` when it says `round_` is open in `phase` (the conditional insert checks that again),
    otherwise the training as committed now: a remembered view never refuses a report."""
    if training.is_open(round_, phase):
        return training
    return await _read_reported(uow, cache, training.id)


async def _read_reported(uow: UnitOfWork, cache: ApiCache, training_id: UUID) -> ReportedTraining:
    """The training as committed now, read in a session of its own (shared with the requests that
    ask at the same time: `ApiCache.read_reported_training`)."""

    async def load() -> ReportedTraining | None:
        async with uow.sessions() as session:
            row = (await session.execute(_REPORTED, {"training_id": training_id})).one_or_none()
        return None if row is None else ReportedTraining(*row)

    await uow.end_reads()  # the shared read needs a connection: this request must not sit on one
    training = await cache.read_reported_training(training_id, load)
    if training is None:
        raise NotFound(f"training {training_id} does not exist")
    return training


async def receive_update(
    uow: UnitOfWork,
    blobs: BlobStore,
    cache: ApiCache,
    reports: Reports,
    training: ReportedTraining,
    client_id: UUID,
    doc: TensorDocument,
) -> UpdateReceipt:
    """Accept a client's update for the open round, all or nothing; a repeat answers the first one."""
    session = uow.session
    round_ = _integer(doc.fields, "round", minimum=None)
    training = await open_or_fresh(uow, cache, training, round_, RoundPhase.COLLECTING)
    repeat = await _repeat_or_closed(session, training, client_id, doc.fields)
    if repeat is not None:
        return repeat
    num_examples = _integer(doc.fields, "num_examples", minimum=1)
    metrics = _metrics(doc.fields.get("metrics"))
    model = await _current_model(session, cache, training)
    spec, excluded = _update_spec(training, model)
    data = await offload(doc.size, _canonical_update, doc, spec, excluded)
    update_id = uuid4()
    key = update_key(update_id)
    await blobs.put(key, data)
    blob = _UpdateBlob(blobs, key)
    uow.on_rollback(blob.undo)
    stored = _Stored(update_id=update_id, key=key, digest=content_key(data)[1], size=len(data))
    return await _record_update(
        uow, reports, blob, training, client_id, doc.fields, stored, num_examples, metrics
    )


async def receive_streamed_update(
    uow: UnitOfWork,
    blobs: BlobStore,
    cache: ApiCache,
    reports: Reports,
    training: ReportedTraining,
    client_id: UUID,
    reader: TensorDocumentReader,
    body_size: int | None = None,
) -> UpdateReceipt:
    """Accept a msgpack update as its body streams in: checked and stored chunk by chunk, never whole.

    The answers are those of `receive_update`. Fields sent before `tensors` are checked before any
    tensor is read (a body of `REPEAT_LOOKUP_BYTES` or more, or of unknown `body_size`, is also
    looked up as a repeat then); when the round comes after the tensors, the stored blob is deleted
    again if the upload turns out to be a repeat or too late.
    """
    session = uow.session
    fields: dict[str, Any] = {}
    item = await reader.next_item()
    while isinstance(item, StreamedField):
        fields[item.name] = item.value
        item = await reader.next_item()
    checked = "round" in fields or item is None
    if checked:
        large = body_size is None or body_size >= REPEAT_LOOKUP_BYTES
        repeat = await _repeat_or_closed(session, training, client_id, fields, look_up=large)
        if repeat is not None:
            return repeat
    if not isinstance(item, StreamedTensors):
        _integer(fields, "num_examples", minimum=1)
        _metrics(fields.get("metrics"))
        parse_tensor_map(None)  # raises: the body has no tensor map
        raise AssertionError("unreachable")
    model = await _current_model(session, cache, training)
    update_id = uuid4()
    key = update_key(update_id)
    written = Written(fields)
    spec, excluded = _update_spec(training, model)
    canonical = written.count(canonical_update(items_after(reader), spec, fields, excluded))
    async with aclosing(canonical) as chunks:
        await blobs.put_stream(key, chunks)
    blob = _UpdateBlob(blobs, key)
    uow.on_rollback(blob.undo)
    # Checked before the tensors already, a repeat or a close since is caught by the conditional
    # insert in `_record_update` (which answers the same); otherwise check now.
    if not checked:
        repeat = await _repeat_or_closed(session, training, client_id, fields)
        if repeat is not None:
            await blobs.delete(key)
            return repeat
    num_examples = _integer(fields, "num_examples", minimum=1)
    metrics = _metrics(fields.get("metrics"))
    stored = _Stored(update_id=update_id, key=key, digest=written.digest, size=written.size)
    return await _record_update(
        uow, reports, blob, training, client_id, fields, stored, num_examples, metrics
    )


@dataclass(slots=True)
class _UpdateBlob:
    """An upload's stored blob, deleted again when the request's unit of work rolls back, unless its
    row committed meanwhile in a group of reports (`recorded`): then the blob is the update's."""

    blobs: BlobStore
    key: str
    recorded: asyncio.Future[bool] | None = None

    async def undo(self) -> None:
        if self.recorded is not None and await recorded_or_not(self.recorded):
            return
        await self.blobs.delete(self.key)


@dataclass(frozen=True, slots=True)
class _Stored:
    update_id: UUID
    key: str
    digest: str
    size: int


async def _current_model(session: AsyncSession, cache: ApiCache, training: ReportedTraining) -> ModelFacts:
    model = await cache.model(session, training.current_model_id)
    if model is None:
        raise NotFound(f"model {training.current_model_id} of training {training.id} does not exist")
    return model


WHOLE_UPLOAD_BYTES = 64 * 1024
"""A msgpack update whose declared length (Content-Length) is at most this is read whole and checked
in one call, as a JSON one is (`receive_update`); a larger or chunked body streams
(`receive_streamed_update`). Most updates are small, and for them the streamed path's chain of
per-step generators costs about five times the CPU (a 10x10 tensor: 75 us against 16 us); the stored
bytes and the answers are the same."""

REPEAT_LOOKUP_BYTES = 64 * 1024
"""A streamed upload this large (or of unknown length) whose round comes before its tensors is
looked up as a repeat before any tensor is read: a retried large upload is never read or stored
twice. A smaller one in an open round goes straight to the insert, which finds a repeat too: one
statement less per upload, and on a (rare) repeat a small blob written and deleted again."""


async def _repeat_or_closed(
    session: AsyncSession,
    training: ReportedTraining,
    client_id: UUID,
    fields: Mapping[str, Any],
    *,
    look_up: bool = False,
) -> UpdateReceipt | None:
    """The first update's receipt for a repeat, `RoundClosed` when the round is not open, else None.

    While the round is open a repeat is looked up only when `look_up`; otherwise it is left to the
    insert in `_record_update`."""
    round_ = _integer(fields, "round", minimum=None)
    if not look_up and training.is_open(round_, RoundPhase.COLLECTING):
        return None
    existing = await _existing_update(session, training.id, round_, client_id)
    if existing is not None:
        return UpdateReceipt(update_id=existing, round=round_, duplicate=True)
    _require_open(training.id, training.state, training.phase, training.round, round_, RoundPhase.COLLECTING)
    return None


async def _record_update(
    uow: UnitOfWork,
    reports: Reports,
    blob: _UpdateBlob,
    training: ReportedTraining,
    client_id: UUID,
    fields: Mapping[str, Any],
    stored: _Stored,
    num_examples: int,
    metrics: dict[str, float | int],
) -> UpdateReceipt:
    """Record the update's row (in the next group of reports, announced in its `UpdatesReceived`) if
    the round is still open and the client has none in it.

    A row left out is a repeat (answered with the first update) or a round that closed since it
    was read (`RoundClosed`); either way the stored blob is deleted again."""
    session = uow.session
    training_id, update_id = training.id, stored.update_id
    round_ = _integer(fields, "round", minimum=None)
    row = {
        "id": update_id,
        "training_id": training_id,
        "round": round_,
        "client_id": client_id,
        "blob_key": stored.key,
        "digest": stored.digest,
        "num_examples": num_examples,
        "metrics": metrics,
        "received_at": utcnow(),
    }
    await uow.end_reads()  # the group needs a connection; this request must not sit on one
    blob.recorded = reports.updates.submit(row)
    if not await asyncio.shield(blob.recorded):
        await blob.blobs.delete(blob.key)
        first = await _existing_update(session, training_id, round_, client_id)
        if first is None:
            await _closed_since(session, training_id, round_, RoundPhase.COLLECTING)
        log.info("update.repeat", training_id=str(training_id), round=round_, client_id=str(client_id))
        return UpdateReceipt(update_id=first, round=round_, duplicate=True)
    log.debug(  # one per client and round: the round's own lines are at info
        "update.received",
        training_id=str(training_id),
        round=round_,
        client_id=str(client_id),
        update_id=str(update_id),
        size_bytes=stored.size,
    )
    return UpdateReceipt(update_id=update_id, round=round_, duplicate=False)


def _update_spec(training: ReportedTraining, model: ModelFacts) -> tuple[TensorSpec, ExcludedTensors]:
    """What an update must hold: the model's tensors but those the training's `exclude_vars` matches."""
    full = _spec(model.spec)
    pattern = training.exclude_vars
    if pattern is None:
        return full, ExcludedTensors(frozenset(), None)
    excluded = frozenset(name for name in full if excluded_by(pattern, name))
    return {n: s for n, s in full.items() if n not in excluded}, ExcludedTensors(excluded, pattern)


def _canonical_update(doc: TensorDocument, spec: TensorSpec, excluded: ExcludedTensors) -> bytes:
    records = doc.records()
    for r in records:
        excluded.refuse(r.name)
    check_against_spec(records, spec)
    position = {name: i for i, name in enumerate(spec)}
    return encode_tensors(sorted(records, key=lambda r: position[r.name]))


async def receive_test_metrics(
    uow: UnitOfWork,
    cache: ApiCache,
    reports: Reports,
    training_id: UUID,
    client_id: UUID,
    report: Mapping[str, Any],
) -> Receipt:
    """Record a client's evaluation of the round's model while the round is testing."""
    session = uow.session
    training = await participant_training(uow, cache, training_id, client_id, fresh=False)
    round_ = _integer(report, "round", minimum=None)
    training = await open_or_fresh(uow, cache, training, round_, RoundPhase.TESTING)
    if not training.is_open(round_, RoundPhase.TESTING):
        if await _existing_test_metric(session, training_id, round_, client_id):
            return Receipt(round=round_, duplicate=True)
        _require_open(training_id, training.state, training.phase, training.round, round_, RoundPhase.TESTING)
    num_examples = _integer(report, "num_examples", minimum=0)
    metrics = _metrics(report.get("metrics"))
    row = {
        "id": uuid4(),
        "training_id": training_id,
        "round": round_,
        "client_id": client_id,
        "num_examples": num_examples,
        "metrics": metrics,
        "received_at": utcnow(),
    }
    await uow.end_reads()  # as for updates: the group needs a connection
    if not await asyncio.shield(reports.test_metrics.submit(row)):
        if not await _existing_test_metric(session, training_id, round_, client_id):
            await _closed_since(session, training_id, round_, RoundPhase.TESTING)
        return Receipt(round=round_, duplicate=True)
    log.debug("test_metrics.received", training_id=str(training_id), round=round_, client_id=str(client_id))
    return Receipt(round=round_, duplicate=False)


async def _existing_update(
    session: AsyncSession, training_id: UUID, round_: int, client_id: UUID
) -> UUID | None:
    return await session.scalar(
        select(ClientUpdate.id).where(
            ClientUpdate.training_id == training_id,
            ClientUpdate.round == round_,
            ClientUpdate.client_id == client_id,
        )
    )


async def _existing_test_metric(
    session: AsyncSession, training_id: UUID, round_: int, client_id: UUID
) -> bool:
    found = await session.scalar(
        select(TestMetric.id).where(
            TestMetric.training_id == training_id,
            TestMetric.round == round_,
            TestMetric.client_id == client_id,
        )
    )
    return found is not None


def _is_open(
    state: TrainingState, phase: RoundPhase | None, open_round: int, round_: int, needed: RoundPhase
) -> bool:
    return state == TrainingState.ONGOING and phase == needed and open_round == round_


def _require_open(
    training_id: UUID,
    state: TrainingState,
    phase: RoundPhase | None,
    open_round: int,
    round_: int,
    needed: RoundPhase,
) -> None:
    if _is_open(state, phase, open_round, round_, needed):
        return
    raise RoundClosed(
        f"training {training_id}: round {round_} does not accept this now "
        f"(open round {open_round}, phase {phase.value if phase else 'none'}, state {state.value}; "
        f"needs phase {needed.value})"
    )


async def _closed_since(
    session: AsyncSession, training_id: UUID, round_: int, needed: RoundPhase
) -> NoReturn:
    """`RoundClosed` naming the training's state now: the orchestrator moved it on since it was read."""
    state, phase, open_round = (
        await session.execute(
            select(Training.state, Training.phase, Training.round).where(Training.id == training_id)
        )
    ).one()
    _require_open(training_id, state, phase, open_round, round_, needed)
    raise RoundClosed(f"training {training_id}: the report for round {round_} could not be recorded")


@functools.cache
def insert_if_open(dialect: str, entity: type[ClientUpdate | TestMetric]) -> Insert:
    """An INSERT of one row of `entity` that happens only while the training is ONGOING in the row's
    round and in the phase that takes such rows, and only when the client has no row in that round.

    One statement for three (a lookup of a repeat, the insert, a recheck of the round): the training
    row is read by the insert itself, FOR SHARE on PostgreSQL, so an orchestrator closing the round
    waits for this commit and then counts this row; on SQLite the insert holds the write lock while
    it reads. Built once per dialect and entity and run with the rows as parameters (one execution
    for a whole group of reports, `services.api.reports`)."""
    table = cast(Table, entity.__table__)
    needed = RoundPhase.COLLECTING if entity is ClientUpdate else RoundPhase.TESTING
    given = [c for c in table.c if c.name not in ("blob_deleted_at", "rejected_reason")]
    params = {c.name: bindparam(c.name, type_=c.type) for c in given}
    row = (
        select(*params.values())
        .where(
            _TRAINING.c.id == params["training_id"],
            _TRAINING.c.state == TrainingState.ONGOING,
            _TRAINING.c.phase == needed,
            _TRAINING.c.round == params["round"],
        )
        .with_for_update(read=True)
    )
    keys = ["training_id", "round", "client_id"]
    return (
        dialect_insert(dialect, table)
        .from_select([c.name for c in given], row)
        .on_conflict_do_nothing(index_elements=keys)
    )


def new_reports(uow: UnitOfWorkFactory) -> Reports:
    """The report groups of an API process (see `services.api.reports`)."""
    return Reports(
        updates=ReportGroups(uow, ClientUpdate, insert_if_open, announce_updates),
        test_metrics=ReportGroups(uow, TestMetric, insert_if_open, announce_test_reports),
    )


def announce_updates(rows: Sequence[Mapping[str, Any]]) -> list[UpdatesReceived]:
    """One `UpdatesReceived` per training round of the update rows a group recorded, rows in order."""
    return [
        UpdatesReceived(
            training_id=training_id,
            round=round_,
            updates=tuple(
                ReceivedUpdate(client_id=r["client_id"], update_id=r["id"], num_examples=r["num_examples"])
                for r in same
            ),
        )
        for (training_id, round_), same in _rows_by_round(rows).items()
    ]


def announce_test_reports(rows: Sequence[Mapping[str, Any]]) -> list[TestReportsReceived]:
    """One `TestReportsReceived` per training round of the test-metric rows a group recorded."""
    return [
        TestReportsReceived(
            training_id=training_id,
            round=round_,
            reports=tuple(
                ReceivedTestReport(client_id=r["client_id"], num_examples=r["num_examples"]) for r in same
            ),
        )
        for (training_id, round_), same in _rows_by_round(rows).items()
    ]


def _rows_by_round(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[UUID, int], list[Mapping[str, Any]]]:
    grouped: dict[tuple[UUID, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["training_id"], row["round"]), []).append(row)
    return grouped


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(fields: Mapping[str, Any], name: str, *, minimum: int | None) -> int:
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise MalformedPayload(f"'{name}' must be an integer{bound}, got {value!r}")
    return value


def _metrics(raw: object) -> dict[str, float | int]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise MalformedPayload(f"'metrics' must be a map of name -> number, got {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise MalformedPayload(f"metric name {key!r} must be a non-empty string")
        if not _is_number(value):
            raise MalformedPayload(f"metric {key!r} must be a finite number, got {value!r}")
    return dict(raw)


def _spec(stored: Mapping[str, Any]) -> TensorSpec:
    return {name: (str(dtype), tuple(int(d) for d in shape)) for name, (dtype, shape) in stored.items()}
