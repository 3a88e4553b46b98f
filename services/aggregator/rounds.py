"""What every round of the aggregator shares, whichever engine computes it; imports no torch.

Two engines compute a round: `services.aggregator.pipeline` (torch: every method, any size, CUDA)
and `services.aggregator.small` (numpy: FedAvg and FedProx over small models). This module holds
what both follow: the errors a round ends in, the checks each update must pass before any
arithmetic (`UpdateCheck`), how a job's update blobs are read and offered (`feed`), and how a
round's tensors are stored (`put_records`, `StoredRound`), so the handlers persist either engine's
outcome the same way.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

import structlog

from shared.aggregation import AggregationSpec, parse_spec
from shared.blobs import BlobStore, content_key
from shared.blobs.base import BlobNotFound
from shared.codec import TensorRecord, decode_tensors, encode_tensors
from shared.errors import FedhubError, MalformedPayload
from shared.events import AggregateRound, UpdateRef
from shared.tensors import TensorSpec, check_against_spec
from shared.threads import off_loop

log = structlog.get_logger(component="aggregator")

U = TypeVar("U")
"""An update as an engine computes with it (a dict of torch tensors, or of numpy arrays)."""


class JobRejected(FedhubError):
    """An aggregation job that cannot succeed however often it is retried; `detail` is the reason.

    `rejected` lists the updates validation left out before the round failed (kept on their rows).
    """

    status_code = 422

    def __init__(self, detail: str, rejected: Sequence[Rejection] = ()) -> None:
        super().__init__(detail)
        self.rejected = tuple(rejected)


class UpdateRejected(FedhubError):
    """One update cannot take part in its round; `detail` is the reason kept on its row."""

    status_code = 422


class InvalidWeight(FedhubError):
    """An update's weight is negative, NaN or infinite."""

    status_code = 422


@dataclass(frozen=True, slots=True)
class Rejection:
    """An update left out of its round, and why."""

    ref: UpdateRef
    reason: str


def round_seed(training_id: UUID, round_number: int) -> int:
    """The method's seed for a training's round: the same on every delivery and every process."""
    digest = hashlib.sha256(f"{training_id}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def job_spec(job: AggregateRound) -> AggregationSpec:
    """The aggregation a job asks for; `JobRejected` when it is not a valid one."""
    try:
        return parse_spec(
            method=job.method,
            params=dict(job.params),
            update_kind=job.update_kind,
            exclude_vars=job.exclude_vars,
            max_update_norm=job.max_update_norm,
        )
    except MalformedPayload as exc:
        raise JobRejected(f"the job's aggregation is not valid: {exc.detail}") from None


@dataclass(frozen=True, slots=True)
class UpdateCheck:
    """What an update's records must be before any engine computes with them.

    `kept`: the signature of the tensors the round aggregates (the base's, minus those matching
    the spec's `exclude_vars`, which clients must leave out: `excluded`).
    """

    spec: AggregationSpec
    kept: TensorSpec
    excluded: frozenset[str]

    @classmethod
    def over(cls, spec: AggregationSpec, base: TensorSpec) -> UpdateCheck:
        """The check for a round of `spec` over a base model of signature `base`.

        Raises `JobRejected` when `exclude_vars` leaves nothing to aggregate.
        """
        excluded = frozenset(name for name in base if spec.excluded(name))
        kept = {name: sig for name, sig in base.items() if name not in excluded}
        if not kept:
            raise JobRejected(f"exclude_vars {spec.exclude_vars!r} matches every tensor of the base model")
        return cls(spec=spec, kept=kept, excluded=excluded)

    def records(self, records: Sequence[TensorRecord]) -> None:
        """Raise `UpdateRejected`, `TensorSpecMismatch` or `NonFiniteValues` saying why `records`
        cannot be used: excluded tensors sent, names, dtypes or shapes off, values not finite."""
        excluded = sorted({r.name for r in records} & self.excluded)
        if excluded:
            raise UpdateRejected(
                f"tensors matching exclude_vars {self.spec.exclude_vars!r} must be left out: "
                + ", ".join(excluded)
            )
        check_against_spec(records, self.kept)

    def norm(self, total_squares: float) -> None:
        """`UpdateRejected` when the delta's L2 norm (from its sum of squares) exceeds `max_update_norm`."""
        bound = self.spec.max_update_norm
        norm = math.sqrt(total_squares)
        if bound is not None and not norm <= bound:
            raise UpdateRejected(f"update norm {norm:.6g} exceeds max_update_norm {bound:g}")


async def read_blob(blobs: BlobStore, key: str, what: str) -> bytes:
    """A blob the job cannot do without; `JobRejected` naming `what` when it does not exist."""
    try:
        return await blobs.get(key)
    except BlobNotFound:
        raise JobRejected(f"{what}: blob {key!r} does not exist") from None
    except ValueError as exc:  # a key the store refuses outright
        raise JobRejected(f"{what}: {exc}") from None


INLINE_WORK_BYTES = 256 * 1024
"""A round whose base model's bytes times its updates is at most this runs its decoding, checks and
aggregation on the event loop instead of in a worker thread: a few hundred microseconds of work,
where each of the round's ~8 thread hops waited milliseconds for its turn on a busy loop (workload
A: an 18 KiB model, 8 updates). Larger rounds keep the loop free."""


def runs_inline(model_bytes: int, updates: int) -> bool:
    """Whether a round of this size is computed on the event loop (`INLINE_WORK_BYTES`)."""
    return model_bytes * max(1, updates) <= INLINE_WORK_BYTES


class Intake(ABC, Generic[U]):
    """What every engine's round does with an update's bytes: `offer` decodes and checks them
    (`prepare`, the engine's), hands the update on (`take`) and keeps what was accepted, what was
    rejected and why, and the time per stage. Not thread-safe: one caller."""

    def __init__(self) -> None:
        self.inline = False
        """Whether this round's work runs on the event loop (`runs_inline`) rather than in a worker thread."""
        self.accepted: list[UpdateRef] = []
        self.rejected: list[Rejection] = []
        self.seconds: defaultdict[str, float] = defaultdict(float)
        """Time spent per stage so far: `decode`, `validate`, `aggregate` (and `read`, by `feed`)."""

    @abstractmethod
    def prepare(self, records: Sequence[TensorRecord]) -> U:
        """An update's records as full weights over the tensors the round aggregates.

        Raises `UpdateRejected` (or another `FedhubError`) saying why the update cannot be used.
        """

    @abstractmethod
    def take(self, update: U, weight: float) -> None:
        """Add a prepared update with its weight (number of examples); may raise a `FedhubError`."""

    def offer(self, ref: UpdateRef, data: bytes | None) -> str | None:
        """Check one update's bytes and take it in; the rejection reason, or None when accepted.

        `data` None stands for an update whose blob is gone.
        """
        try:
            if data is None:
                raise UpdateRejected(f"blob {ref.blob_key!r} does not exist")
            started = time.perf_counter()
            records = decode_tensors(data)
            decoded = time.perf_counter()
            update = self.prepare(records)
            validated = time.perf_counter()
            self.take(update, float(ref.num_examples))
            self.seconds["decode"] += decoded - started
            self.seconds["validate"] += validated - decoded
            self.seconds["aggregate"] += time.perf_counter() - validated
        except UpdateRejected as exc:
            return self._reject(ref, exc.detail)
        except FedhubError as exc:  # TensorSpecMismatch, NonFiniteValues, MalformedPayload, a weight
            return self._reject(ref, f"{exc.name}: {exc.detail}")
        self.accepted.append(ref)
        return None

    def require_accepted(self) -> None:
        """`JobRejected` listing every rejection when no update was accepted."""
        if not self.accepted:
            reasons = "; ".join(f"update {r.ref.update_id}: {r.reason}" for r in self.rejected)
            raise JobRejected(
                f"no update could be aggregated ({reasons or 'the job lists none'})", self.rejected
            )

    def _reject(self, ref: UpdateRef, reason: str) -> str:
        self.rejected.append(Rejection(ref, reason))
        log.warning(
            "update.rejected", update_id=str(ref.update_id), client_id=str(ref.client_id), reason=reason
        )
        return reason


FEED_BYTES = 64 * 1024 * 1024
"""Update bytes held at once while feeding a round: small updates are read and offered in batches
up to this size (one thread hop per batch instead of one per update), larger ones one at a time."""
FEED_MAX_UPDATES = 256
"""Updates per batch at most, however small."""


async def feed(round_: Intake[Any], refs: Sequence[UpdateRef], blobs: BlobStore) -> None:
    """Offer `refs` to the round in order, in batches of at most `FEED_BYTES` of update bytes.

    The first update is read alone; its size (a round's updates are alike) sets how many are read
    at once after it, in one `BlobStore.get_many` (one query on PostgreSQL); an update whose blob is
    gone reads as None and is rejected. A batch's bytes are dropped before the next batch is read.
    """
    window, start = 1, 0
    while start < len(refs):
        batch = refs[start : start + window]
        started = time.perf_counter()
        datas = await blobs.get_many([ref.blob_key for ref in batch])
        round_.seconds["read"] += time.perf_counter() - started
        await off_loop(round_.inline, _offer_all, round_, batch, datas)
        largest = max((len(d) for d in datas if d is not None), default=0)
        del datas
        window = max(1, min(FEED_MAX_UPDATES, FEED_BYTES // max(largest, 1)))
        start += len(batch)


def _offer_all(round_: Intake[Any], refs: Sequence[UpdateRef], datas: list[bytes | None]) -> None:
    for ref, data in zip(refs, datas, strict=True):
        round_.offer(ref, data)


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A tensor blob written to the store: its content key, digest, size and spec."""

    key: str
    digest: str
    size: int
    spec: dict[str, list[Any]]


def encode_records(records: Sequence[TensorRecord]) -> tuple[bytes, StoredBlob]:
    """The canonical blob of `records` and what the model row keeps about it."""
    data = encode_tensors(records)
    key, digest = content_key(data)
    spec = {r.name: [r.dtype, list(r.shape)] for r in records}
    return data, StoredBlob(key=key, digest=digest, size=len(data), spec=spec)


async def put_records(blobs: BlobStore, records: Sequence[TensorRecord]) -> StoredBlob:
    """Encode tensors (off the event loop unless small) and store them under their content address."""
    size = sum(r.data.nbytes for r in records)
    data, blob = await off_loop(runs_inline(size, 1), encode_records, records)
    # Written before the commit: if the transaction rolls back, the blob is an orphan under its own
    # content address, which the retry rewrites (a no-op) rather than duplicates.
    await blobs.put(blob.key, data)
    return blob


@dataclass(frozen=True, slots=True)
class StoredRound:
    """A computed round whose blobs are stored, ready for its rows: what either engine hands back."""

    engine: Literal["numpy", "torch"]
    """Which engine computed the round (`fedhub_aggregator_rounds_total`)."""
    model: StoredBlob
    state: StoredBlob | None
    members: list[StoredBlob]
    accepted: tuple[UpdateRef, ...]
    rejected: tuple[Rejection, ...]
    record: dict[str, Any] = field(default_factory=dict)
    """The method's JSON-able facts about the round (see `methods.Aggregate.record`)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Time spent per stage (`read`, `decode`, `validate`, `aggregate`, `store`), for the metrics."""
