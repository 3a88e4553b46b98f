"""One round's aggregation without the database: base model and update blobs in, the round's outcome out.

`aggregate_round` reads the job's blobs one at a time and hands them to a `RoundPipeline`, which does
the CPU work (run in a thread):

1. The base model (and the server state its round left) is decoded; the method is built over
   ``RoundContext(base restricted to the tensors not matching exclude_vars, device, state, seed)``
   with the seed derived from (training id, round), so a redelivered job gives the same result.
2. Each update, in order (read in batches of at most `FEED_BYTES`, released before the next
   batch is read; a large update alone), is decoded into
   tensors that are views of msgpack's bytes (`update_views`: no copy, no per-element work) and
   checked: exactly the base's tensors minus the excluded ones, the base's dtypes and shapes,
   finite values. A `delta` upload becomes full weights, ``w = base + delta`` in the tensor's dtype
   (integers too: the SDK's ``w - base`` wraps the same way, so the sum is exact; a bool tensor's
   delta is ``w xor base``). With `max_update_norm`, the L2 norm of the delta over the floating
   tensors (in float64) must not exceed it. An update failing any of this is *rejected* with its
   reason: it is left out and the round goes on.
3. Accepted updates go to the method on its device (`DeviceTransfer`: pinned, overlapped copies
   on CUDA). A linear method that folds windows (`LinearMethod.folds_windows`: the CPU, no
   per-update transform) gets them `fold_window` at a time (``FEDHUB_AGGREGATOR_FOLD_WINDOW``,
   default `DEFAULT_FOLD_WINDOW`): each is checked as it comes (a refused one is rejected at once)
   and held until the window is full, then `add_many` folds the window in one pass over the
   accumulators. Memory: at most `fold_window` decoded updates plus the accumulator, window + 1
   models, whatever the number of clients. Other methods get each update as it comes (`add`).
   The method's result gets the excluded tensors back from the base, in the base's order (its
   ensemble members too).

A round split across jobs (`services.aggregator.split`) uses the same pipeline per part: a batch of
a linear method ends in `partial()`, a shard of a coordinate-wise method (built with `tensors`)
validates whole updates but feeds the method its tensors only; the combine job merges batches with
`merge_batch` then `finish()`, or puts shards together with `finish_shards`.

What no retry can fix (an unknown method, a bad spec, a missing or undecodable base model, no
update accepted, a method refusing the round) raises `JobRejected`; anything else (the blob store
down) propagates, so the job is retried.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from services.aggregator.methods import (
    METHODS,
    Aggregate,
    LinearMethod,
    Method,
    NothingToAggregate,
    Partial,
    RoundContext,
)
from services.aggregator.methods.base import InvalidWeight, TooFewUpdates, UpdateMismatch
from services.aggregator.methods.buffers import BufferLease
from services.aggregator.rounds import (
    Intake,
    JobRejected,
    Rejection,
    UpdateCheck,
    feed,
    job_spec,
    read_blob,
    round_seed,
    runs_inline,
)
from services.aggregator.transfer import DeviceTransfer
from shared.aggregation import AggregationSpec, UpdateKind
from shared.blobs import BlobStore
from shared.codec import TensorRecord, decode_tensors
from shared.errors import FedhubError
from shared.events import AggregateRound, UpdateRef
from shared.tensors import records_to_state_dict, to_torch
from shared.threads import off_loop


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What a round gave: the method's aggregate (full models), the updates taken and those left out."""

    aggregate: Aggregate
    accepted: tuple[UpdateRef, ...]
    rejected: tuple[Rejection, ...]
    seconds: Mapping[str, float] = field(default_factory=dict)
    """Time spent per stage (`read`, `decode`, `validate`, `aggregate`), for the aggregator's metrics."""


def decode_state_dict(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """A stored tensor blob as CPU tensors; `JobRejected` naming `what` when it does not decode."""
    try:
        return records_to_state_dict(decode_tensors(data))
    except FedhubError as exc:
        raise JobRejected(f"{what}: {exc.name}: {exc.detail}") from exc


DEFAULT_FOLD_WINDOW = 4
"""Decoded updates a round holds before a linear method folds them (``FEDHUB_AGGREGATOR_FOLD_WINDOW``)."""


class RoundPipeline(Intake[dict[str, torch.Tensor]]):
    """The synchronous core of a round: validate and convert each update, feed the method, finish.

    Built over the decoded base model; `offer` (see `rounds.Intake`) takes one update's bytes and
    returns the reason it was rejected (None when accepted); `finish` gives the outcome.
    `fold_window`: updates held before a windowed linear method folds them (see the module doc).
    """

    def __init__(
        self,
        spec: AggregationSpec,
        base: Mapping[str, torch.Tensor],
        *,
        device: torch.device,
        seed: int,
        state: Mapping[str, torch.Tensor] | None = None,
        method_cls: type[Method] | None = None,
        tensors: Sequence[str] | None = None,
        fold_window: int = DEFAULT_FOLD_WINDOW,
        buffers: BufferLease | None = None,
    ) -> None:
        super().__init__()
        if fold_window < 1:
            raise ValueError(f"fold_window must be at least 1, got {fold_window}")
        cls = method_cls if method_cls is not None else METHODS.get(spec.method)
        if cls is None:
            known = ", ".join(sorted(str(m) for m in METHODS))
            raise JobRejected(f"aggregation method {spec.method.value!r} is not available (known: {known})")
        self.spec = spec
        self._order = list(base)
        self._check = UpdateCheck.over(
            spec, {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in base.items()}
        )
        self._excluded = {name: t for name, t in base.items() if name in self._check.excluded}
        self._kept = {name: t for name, t in base.items() if name in self._check.kept}
        # A shard of a coordinate-wise round: updates are validated whole, the method sees its tensors.
        self._computed = list(self._kept) if tensors is None else list(tensors)
        unknown = [name for name in self._computed if name not in self._kept]
        if unknown:
            raise JobRejected(f"the shard names tensors the round does not aggregate: {', '.join(unknown)}")
        computed = {name: self._kept[name] for name in self._computed}
        ctx = RoundContext(
            base=computed,
            device=device,
            state=dict(state or {}),
            seed=seed,
            buffers=buffers if buffers is not None else BufferLease(),
        )
        self.method = cls(ctx, spec.typed_params())
        # Validation runs on the CPU over the decoded bytes; the method gets its tensors on the device
        # (pinned, overlapped copies on CUDA; the same tensors on the CPU).
        self._transfer = DeviceTransfer(device)
        self._fold_window = fold_window
        self._windowed: LinearMethod | None = None
        if isinstance(self.method, LinearMethod) and self.method.folds_windows and fold_window > 1:
            self._windowed = self.method
        self._window: list[tuple[dict[str, torch.Tensor], float]] = []

    def prepare(self, records: Sequence[TensorRecord]) -> dict[str, torch.Tensor]:
        """An update's records as full weights over the kept tensors.

        Raises `UpdateRejected`, `TensorSpecMismatch` or `NonFiniteValues` saying why it cannot be used.
        """
        self._check.records(records)  # excluded tensors, names, dtypes, shapes, finite values
        tensors = update_views(records)
        if self.spec.update_kind is UpdateKind.DELTA:
            self._check_norm(tensors, delta=True)
            full = {name: _plus(self._kept[name], tensors[name]) for name in self._kept}
        else:
            self._check_norm(tensors, delta=False)
            full = {name: tensors[name] for name in self._kept}
        return full

    def take(self, update: dict[str, torch.Tensor], weight: float) -> None:
        """Move the update's computed tensors to the device and hand them to the method (or its
        window); raises `UpdateMismatch` or `InvalidWeight` as the method refuses it."""
        self._add(self._transfer.to_device({name: update[name] for name in self._computed}), weight)

    def finish(self) -> RoundOutcome:
        """The round's outcome; `JobRejected` when nothing was accepted or the method refuses."""
        started = time.perf_counter()
        aggregate = self._result()
        outcome = Aggregate(
            model=self._complete(aggregate.model, "model"),
            state=aggregate.state,
            members=[self._complete(m, f"member {i}") for i, m in enumerate(aggregate.members)],
            record=aggregate.record,
        )
        self.seconds["aggregate"] += time.perf_counter() - started
        return RoundOutcome(outcome, tuple(self.accepted), tuple(self.rejected), dict(self.seconds))

    def partial(self) -> Partial:
        """A batch's contribution to a linear method, for `merge_batch` elsewhere (ends this pipeline)."""
        if not isinstance(self.method, LinearMethod):
            raise TypeError(
                f"{type(self.method).__name__} is not a linear method: its rounds are not batched"
            )
        started = time.perf_counter()
        self._fold()
        self.seconds["aggregate"] += time.perf_counter() - started
        return self.method.partial()

    def shard_result(self) -> Aggregate:
        """A shard's outcome: the method's aggregate over the shard's tensors (not completed)."""
        return self._result()

    def merge_batch(
        self, partial: Partial, accepted: Sequence[UpdateRef], rejected: Sequence[Rejection]
    ) -> None:
        """Fold another batch's partial in, with the updates that batch took and left out."""
        if not isinstance(self.method, LinearMethod):
            raise TypeError(f"{type(self.method).__name__} is not a linear method: it merges no batches")
        self._fold()
        try:
            self.method.merge(partial)
        except (UpdateMismatch, InvalidWeight, ValueError) as exc:
            raise JobRejected(f"a batch's partial does not fit the round: {exc}") from exc
        self.accepted.extend(accepted)
        self.rejected.extend(rejected)

    def finish_shards(
        self, shards: Sequence[Aggregate], accepted: Sequence[UpdateRef], rejected: Sequence[Rejection]
    ) -> RoundOutcome:
        """The round's outcome from its shards' aggregates (each over its own tensors)."""
        model: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        record: dict[str, Any] = {}
        for shard in shards:
            model.update(shard.model)
            state.update(shard.state)
            record.update(shard.record)
        self.accepted, self.rejected = list(accepted), list(rejected)
        outcome = Aggregate(model=self._complete(model, "model"), state=state, record=record)
        return RoundOutcome(outcome, tuple(self.accepted), tuple(self.rejected))

    def _check_norm(self, tensors: Mapping[str, torch.Tensor], *, delta: bool) -> None:
        if self.spec.max_update_norm is None:
            return
        total = 0.0
        for name, tensor in tensors.items():
            if not tensor.dtype.is_floating_point:
                continue
            diff = tensor.to(torch.float64, copy=True)
            if not delta:
                diff.sub_(self._kept[name])
            total += float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
        self._check.norm(total)

    def _add(self, update: dict[str, torch.Tensor], weight: float) -> None:
        """Hand an accepted update to the method: at once, or into the window (folded when full).

        Raises what the method's `add` (or `check`) refuses the update with.
        """
        if self._windowed is None:
            self.method.add(update, weight)
            return
        self._windowed.check(update, weight)
        self._window.append((update, weight))
        if len(self._window) >= self._fold_window:
            self._fold()

    def _fold(self) -> None:
        """Fold the held window into the method (checked already, so nothing is refused here)."""
        if self._windowed is None or not self._window:
            return
        updates, weights = zip(*self._window, strict=True)
        self._window.clear()
        self._windowed.add_many(updates, weights)

    def _result(self) -> Aggregate:
        self._fold()
        self.require_accepted()
        try:
            return self.method.result()
        except (NothingToAggregate, TooFewUpdates) as exc:
            raise JobRejected(f"{exc.name}: {exc.detail}", self.rejected) from exc

    def _complete(self, tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        """`tensors` (the kept ones) plus the excluded ones from the base, in the base's order."""
        out: dict[str, torch.Tensor] = {}
        for name in self._order:
            if name in self._excluded:
                out[name] = self._excluded[name]
            elif name in tensors:
                out[name] = tensors[name]
            else:
                raise RuntimeError(f"{type(self.method).__name__} left tensor {name!r} out of its {what}")
        return out


def update_views(records: Sequence[TensorRecord]) -> dict[str, torch.Tensor]:
    """An update's tensors as views of the decoded bytes: no copy, no per-element work.

    The bytes are read-only; nothing writes to an update's tensors (the pipeline's delta and norm
    work is out of place, and methods never write to what `add` gets), so the views are safe.
    """
    return {r.name: to_torch(r, read_only=True) for r in records}


def _plus(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``base + delta`` in the tensor's dtype (bool: xor)."""
    if base.dtype == torch.bool:
        return torch.logical_xor(base, delta)
    return torch.add(base, delta)


async def open_round(
    job: AggregateRound,
    blobs: BlobStore,
    device: torch.device,
    tensors: Sequence[str] | None = None,
    *,
    fold_window: int = DEFAULT_FOLD_WINDOW,
    buffers: BufferLease | None = None,
) -> RoundPipeline:
    """Read and decode the job's base model and state and build its pipeline (off the event loop).

    `tensors`: the shard this pipeline computes (None: every tensor the round aggregates);
    `fold_window`: see `RoundPipeline`; `buffers`: the round's lease on the aggregator's buffer pool.
    """
    spec = job_spec(job)
    base_bytes = await read_blob(blobs, job.base_blob_key, f"base model {job.base_model_id}")
    inline = runs_inline(len(base_bytes), len(job.updates))
    base = await off_loop(inline, decode_state_dict, base_bytes, f"base model {job.base_model_id}")
    del base_bytes
    state: dict[str, torch.Tensor] = {}
    if job.base_state_blob_key is not None:
        what = f"server state of base model {job.base_model_id}"
        state_bytes = await read_blob(blobs, job.base_state_blob_key, what)
        state = await off_loop(inline, decode_state_dict, state_bytes, what)
        del state_bytes
    pipeline = await off_loop(
        inline,
        RoundPipeline,
        spec,
        base,
        device=device,
        seed=round_seed(job.training_id, job.round),
        state=state,
        tensors=tensors,
        fold_window=fold_window,
        buffers=buffers,
    )
    pipeline.inline = inline
    return pipeline


async def aggregate_round(
    job: AggregateRound,
    blobs: BlobStore,
    device: torch.device,
    *,
    fold_window: int = DEFAULT_FOLD_WINDOW,
    buffers: BufferLease | None = None,
) -> RoundOutcome:
    """Run a whole round: base, every update of the job, the method's result (see the module doc).

    With `buffers`, the method's accumulators come from that lease (the model's tensors may be
    among them: give them back once the outcome is stored, never before).
    """
    if not job.updates:
        raise JobRejected("the job lists no updates")
    pipeline = await open_round(job, blobs, device, fold_window=fold_window, buffers=buffers)
    await feed(pipeline, job.updates, blobs)
    return await off_loop(pipeline.inline, pipeline.finish)
