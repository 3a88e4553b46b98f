"""The torch engine: every round the numpy one (`services.aggregator.small`) does not take.

Importing this module imports torch; the handlers import it when the first such round comes
(`handlers.LazyEngine`), so an aggregator whose rounds are all small FedAvg never loads torch.
It holds what lives across rounds on the torch side: the device, the buffer pool and the fold
window. Each call runs a round (or a split round's part or combination) with
`services.aggregator.pipeline` and stores its tensors; the handlers persist the rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from services.aggregator.methods import METHODS, Aggregate, Method, Partial
from services.aggregator.methods.buffers import BufferPool
from services.aggregator.models import AggregationPart
from services.aggregator.pipeline import RoundOutcome, aggregate_round, decode_state_dict, open_round
from services.aggregator.rounds import (
    JobRejected,
    Rejection,
    StoredBlob,
    StoredRound,
    feed,
    put_records,
    read_blob,
    runs_inline,
)
from services.aggregator.settings import AggregatorSettings, DeviceUnavailable
from shared.aggregation import AggregationMethod
from shared.blobs import BlobStore
from shared.codec import encode_tensors
from shared.events import AggregatePart, AggregateRound
from shared.tensors import state_dict_to_records
from shared.threads import off_loop


def resolve_device(choice: Literal["auto", "cpu", "cuda"]) -> torch.device:
    """The torch device a `device` setting names; `cuda` without a visible GPU is refused."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device 'cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(choice)


class TorchEngine:
    """Runs rounds with the torch pipeline on the settings' device (see the module doc)."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.device = resolve_device(settings.device)
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        self.buffers = BufferPool(settings.buffer_pool_mib * 1024 * 1024)
        self.fold_window = settings.fold_window

    @staticmethod
    def method_class(method: AggregationMethod) -> type[Method] | None:
        """The class implementing `method`, if any (for planning a split)."""
        return METHODS.get(method)

    async def run_round(self, job: AggregateRound, blobs: BlobStore) -> StoredRound:
        """Aggregate the job's updates and store the outcome's tensors; `JobRejected` as the pipeline."""
        lease = self.buffers.lease()
        try:
            outcome = await aggregate_round(
                job, blobs, self.device, fold_window=self.fold_window, buffers=lease
            )
            stored = await store(outcome, blobs)
            # Stored: the model's buffers serve the next round's accumulators.
            lease.give_back(outcome.aggregate.model.values())
            return stored
        finally:
            lease.close()

    async def compute_part(self, part: AggregatePart, blobs: BlobStore, key: str) -> AggregationPart:
        """Run one part and store its result under `key`; its row (not yet added) says what it took,
        left out or failed."""
        job = part.round_job
        row = AggregationPart(training_id=job.training_id, round=job.round, part=part.part, record={})
        try:
            pipeline = await open_round(
                job, blobs, self.device, tensors=part.tensors or None, fold_window=self.fold_window
            )
        except JobRejected as exc:
            row.failure, row.accepted, row.rejected = exc.detail, [], []
            return row
        await feed(pipeline, job.updates, blobs)
        try:
            if part.tensors:
                shard = await asyncio.to_thread(pipeline.shard_result)
                tensors = {f"model/{k}": v for k, v in shard.model.items()}
                tensors.update({f"state/{k}": v for k, v in shard.state.items()})
                row.record = shard.record
            else:
                tensors = (await asyncio.to_thread(pipeline.partial)).to_tensors()
        except JobRejected as exc:
            row.failure = exc.detail
        else:
            await blobs.put(key, await asyncio.to_thread(_encode_state, tensors))
            row.blob_key = key
        row.accepted = [str(r.update_id) for r in pipeline.accepted]
        row.rejected = [[str(r.ref.update_id), r.reason] for r in pipeline.rejected]
        return row

    async def combine(
        self, job: AggregateRound, kind: str, parts: Sequence[AggregationPart], blobs: BlobStore
    ) -> StoredRound:
        """The round from its parts, stored; `JobRejected` when a part failed or nothing was accepted."""
        return await store(await self._combine(job, kind, parts, blobs), blobs)

    async def _combine(
        self, job: AggregateRound, kind: str, parts: Sequence[AggregationPart], blobs: BlobStore
    ) -> RoundOutcome:
        refs = {str(r.update_id): r for r in job.updates}
        rejected: dict[str, Rejection] = {}
        for p in parts:
            for update_id, reason in p.rejected:
                rejected.setdefault(update_id, Rejection(refs[update_id], reason))
        failed = next((p for p in parts if p.failure is not None), None)
        if failed is not None:
            raise JobRejected(f"part {failed.part}: {failed.failure}", list(rejected.values()))
        pipeline = await open_round(job, blobs, self.device)
        if kind == "batches":
            for p in parts:
                assert p.blob_key is not None  # a part without failure stored its result
                tensors = decode_state_dict(
                    await read_blob(blobs, p.blob_key, f"part {p.part}"), f"part {p.part}"
                )
                batch_rejected = [Rejection(refs[u], reason) for u, reason in p.rejected]
                await asyncio.to_thread(
                    pipeline.merge_batch,
                    Partial.from_tensors(tensors),
                    [refs[u] for u in p.accepted],
                    batch_rejected,
                )
            return await asyncio.to_thread(pipeline.finish)
        shards = []
        for p in parts:
            assert p.blob_key is not None
            tensors = decode_state_dict(
                await read_blob(blobs, p.blob_key, f"part {p.part}"), f"part {p.part}"
            )
            shards.append(
                Aggregate(
                    model={k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")},
                    state={k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")},
                    record=dict(p.record or {}),
                )
            )
        accepted = [refs[u] for u in parts[0].accepted]
        return await asyncio.to_thread(pipeline.finish_shards, shards, accepted, list(rejected.values()))


async def put_tensors(blobs: BlobStore, tensors: Mapping[str, torch.Tensor]) -> StoredBlob:
    """Store a state dict under its content address (see `rounds.put_records`); its bytes are
    copied out of the tensors off the event loop unless small."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    records = await off_loop(runs_inline(size, 1), state_dict_to_records, tensors)
    return await put_records(blobs, records)


def _encode_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A part's tensors as a blob for its own key: no content address, so no digest to compute."""
    return encode_tensors(state_dict_to_records(tensors))


async def store(outcome: RoundOutcome, blobs: BlobStore) -> StoredRound:
    """Store the round's model, server state and members (before the transaction that records them)."""
    started = time.perf_counter()
    aggregate = outcome.aggregate
    model = await put_tensors(blobs, aggregate.model)
    state = await put_tensors(blobs, aggregate.state) if aggregate.state else None
    members = [await put_tensors(blobs, member) for member in aggregate.members]
    return StoredRound(
        engine="torch",
        model=model,
        state=state,
        members=members,
        accepted=outcome.accepted,
        rejected=outcome.rejected,
        record=aggregate.record,
        seconds={**outcome.seconds, "store": time.perf_counter() - started},
    )
