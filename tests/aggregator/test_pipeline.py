"""The round pipeline without a database: validation, rejections, deltas, excluded tensors, norms, seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
import torch

from services.aggregator import rounds
from services.aggregator.methods import DPFedAvg, FedAvg, RoundContext
from services.aggregator.pipeline import DEFAULT_FOLD_WINDOW, RoundPipeline, aggregate_round, update_views
from services.aggregator.rounds import JobRejected, feed, job_spec, round_seed
from services.aggregator.settings import AggregatorSettings
from shared import threads
from shared.aggregation import AggregationMethod, AggregationSpec, MethodParams
from shared.blobs import LocalBlobStore
from shared.codec import decode_tensors, encode_tensors
from shared.events import AggregateRound, UpdateRef
from shared.tensors import state_dict_to_records
from tests.aggregator.fakes import KeepAll

CPU = torch.device("cpu")


def encode(state: Mapping[str, torch.Tensor]) -> bytes:
    """The canonical blob of a state dict."""
    return encode_tensors(state_dict_to_records(state))


def model(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A model with floating, integer and bool tensors; `head.*` is what the tests exclude."""
    return {
        "body.weight": torch.randn(5, 4, generator=gen),
        "body.bias": torch.randn(5, generator=gen, dtype=torch.float64),
        "head.weight": torch.randn(2, 5, generator=gen),
        "bn.num_batches_tracked": torch.randint(0, 100, (), generator=gen, dtype=torch.int64),
        "mask": torch.randint(0, 2, (3,), generator=gen).to(torch.bool),
        "half": torch.randn(6, generator=gen).to(torch.bfloat16),
    }


def ref(num_examples: int = 10) -> UpdateRef:
    """A reference to an update (its blob is handed to the pipeline directly)."""
    update_id = uuid4()
    return UpdateRef(
        update_id=update_id, client_id=uuid4(), blob_key=f"update/{update_id}", num_examples=num_examples
    )


def pipeline(base: Mapping[str, torch.Tensor], **spec: Any) -> RoundPipeline:
    """A pipeline over `base` for the given spec fields (FedAvg unless `method` says otherwise)."""
    return RoundPipeline(AggregationSpec(**spec), base, device=CPU, seed=7)


def delta_of(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the SDK uploads with update_kind=delta."""
    return {
        k: torch.logical_xor(v, base[k]) if v.dtype == torch.bool else v - base[k] for k, v in new.items()
    }


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator."""
    return torch.Generator().manual_seed(3)


def test_weights_round_is_the_weighted_mean(gen):
    """Full-weight updates: the model is FedAvg's weighted mean, every tensor in the base's order."""
    base = model(gen)
    updates = [model(gen) for _ in range(3)]
    p = pipeline(base)
    refs = [ref(n) for n in (1, 2, 5)]
    for r, u in zip(refs, updates, strict=True):
        assert p.offer(r, encode(u)) is None
    outcome = p.finish()
    assert list(outcome.aggregate.model) == list(base)
    assert outcome.accepted == tuple(refs) and outcome.rejected == ()
    expected = sum(n * u["body.weight"].double() for n, u in zip((1, 2, 5), updates, strict=True)) / 8
    np.testing.assert_allclose(outcome.aggregate.model["body.weight"].numpy(), expected.numpy(), rtol=1e-5)


def test_delta_uploads_give_the_same_model_as_weight_uploads(gen):
    """update_kind=delta with base + delta in each dtype equals the weights round (ints and bools exactly)."""
    base = model(gen)
    updates = [model(gen) for _ in range(4)]
    weights, deltas = pipeline(base), pipeline(base, update_kind="delta")
    for i, u in enumerate(updates):
        r = ref(3 + i)
        assert weights.offer(r, encode(u)) is None
        assert deltas.offer(r, encode(delta_of(u, base))) is None
    a, b = weights.finish().aggregate.model, deltas.finish().aggregate.model
    assert list(a) == list(b) == list(base)
    for name in base:
        assert a[name].dtype == b[name].dtype == base[name].dtype
        if base[name].dtype.is_floating_point:
            torch.testing.assert_close(
                a[name].double(), b[name].double(), rtol=0, atol=1e-6 if name != "half" else 1e-2
            )
        else:
            assert torch.equal(a[name], b[name]), name


def test_integer_delta_wraps_like_the_client_and_adds_back_exactly():
    """An int8 delta that wrapped on the client (w - base overflowed) adds back to w exactly."""
    base = {"w": torch.tensor([1.0]), "count": torch.tensor([120, -120], dtype=torch.int8)}
    new = {"w": torch.tensor([2.0]), "count": torch.tensor([-120, 120], dtype=torch.int8)}
    p = pipeline(base, update_kind="delta")
    assert p.offer(ref(), encode(delta_of(new, base))) is None
    assert torch.equal(p.finish().aggregate.model["count"], new["count"])


def test_excluded_tensors_keep_the_base_values_and_are_refused_in_updates(gen):
    """exclude_vars: updates without `head.*` aggregate the rest; `head.*` comes back from the base."""
    base = model(gen)
    p = pipeline(base, exclude_vars=r"^head\.")
    assert "head.weight" not in p.method.ctx.base
    good = {k: v for k, v in model(gen).items() if not k.startswith("head.")}
    carrying = model(gen)
    bad_ref = ref()
    assert p.offer(ref(), encode(good)) is None
    reason = p.offer(bad_ref, encode(carrying))
    assert reason is not None and "head.weight" in reason and "exclude_vars" in reason
    outcome = p.finish()
    assert [r.ref for r in outcome.rejected] == [bad_ref]
    result = outcome.aggregate.model
    assert list(result) == list(base)
    assert torch.equal(result["head.weight"], base["head.weight"])
    assert torch.equal(result["body.weight"], good["body.weight"])


def test_exclude_vars_matching_everything_is_refused(gen):
    """A pattern that leaves nothing to aggregate fails the job at once."""
    with pytest.raises(JobRejected, match="every tensor"):
        pipeline(model(gen), exclude_vars=".")


@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_max_update_norm_rejects_large_updates_only(kind):
    """The L2 norm of the delta over floating tensors decides; integer tensors do not count."""
    base = {"w": torch.zeros(4), "d": torch.zeros(2, dtype=torch.float64), "n": torch.tensor(0)}
    small = {"w": torch.tensor([1.0, 1.0, 1.0, 0.0]), "d": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    large = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "d": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    # Norms 2 and sqrt(5); the integer tensor's jump of 1000 is not part of either.
    small["n"] = large["n"] = torch.tensor(1000)
    p = pipeline(base, update_kind=kind, max_update_norm=2.0)
    assert p.offer(ref(), encode(small)) is None
    reason = p.offer(ref(), encode(large))
    assert reason == "update norm 2.23607 exceeds max_update_norm 2"
    assert len(p.finish().accepted) == 1


def test_norm_of_a_weights_upload_is_measured_from_the_base():
    """With full weights the norm is that of (update - base), not of the update."""
    base = {"w": torch.full((4,), 100.0)}
    p = pipeline(base, max_update_norm=1.0)
    assert p.offer(ref(), encode({"w": torch.full((4,), 100.25)})) is None


@pytest.mark.parametrize(
    ("update", "says"),
    [
        ({"w": torch.zeros(2), "v": torch.zeros(2), "extra": torch.zeros(1)}, "unknown tensor names: extra"),
        ({"w": torch.zeros(2)}, "missing tensor names: v"),
        ({"w": torch.zeros(3), "v": torch.zeros(2)}, "'w': shape [3]"),
        ({"w": torch.zeros(2), "v": torch.zeros(2, dtype=torch.float64)}, "'v': dtype float64"),
        ({"w": torch.tensor([0.0, float("inf")]), "v": torch.zeros(2)}, "'w' holds NaN or Inf"),
    ],
    ids=["unknown", "missing", "shape", "dtype", "inf"],
)
def test_unfit_updates_are_rejected_with_a_reason(update, says):
    """Every validation failure is a rejection naming the tensor, never an exception."""
    p = pipeline({"w": torch.zeros(2), "v": torch.zeros(2)})
    r = ref()
    reason = p.offer(r, encode(update))
    assert reason is not None and says in reason
    assert [x.ref for x in p.rejected] == [r]
    assert p.accepted == []


def test_undecodable_and_missing_blobs_are_rejected():
    """Bytes that are not a tensor document, or no bytes at all (blob gone), reject the update."""
    p = pipeline({"w": torch.zeros(2)})
    assert "MalformedPayload" in (p.offer(ref(), b"\xc1") or "")
    assert "does not exist" in (p.offer(ref(), None) or "")


def test_nothing_accepted_fails_with_every_reason():
    """No accepted update: JobRejected lists each rejected update and carries the rejections."""
    p = pipeline({"w": torch.zeros(2)})
    r1, r2 = ref(), ref()
    p.offer(r1, b"\xc1")
    p.offer(r2, None)
    with pytest.raises(JobRejected) as caught:
        p.finish()
    assert str(r1.update_id) in caught.value.detail and str(r2.update_id) in caught.value.detail
    assert [x.ref for x in caught.value.rejected] == [r1, r2]


def test_the_method_gets_the_state_the_device_and_a_round_seed(gen):
    """RoundContext carries the previous state, the device and a seed fixed by (training, round)."""
    base = {"w": torch.zeros(3)}
    state = {"m/w": torch.ones(3)}
    p = RoundPipeline(AggregationSpec(method="fedadam"), base, device=CPU, seed=11, state=state)
    assert p.method.ctx.state == state
    assert (p.method.ctx.device, p.method.ctx.seed) == (CPU, 11)
    assert p.offer(ref(), encode({"w": torch.ones(3)})) is None
    outcome = p.finish()
    assert set(outcome.aggregate.state) >= {"m/w", "v/w"}
    training = uuid4()
    assert round_seed(training, 2) == round_seed(training, 2)
    assert len({round_seed(training, 1), round_seed(training, 2), round_seed(uuid4(), 1)}) == 3
    assert 0 <= round_seed(training, 1) < 2**63


def test_members_get_the_excluded_tensors_back_in_the_base_order(gen):
    """Each ensemble member is a full model: excluded tensors from the base, in the base's order."""
    base = model(gen)
    spec = AggregationSpec(method="ensemble", exclude_vars="^head")
    p = RoundPipeline(spec, base, device=CPU, seed=0, method_cls=KeepAll)
    sent = [{k: v for k, v in model(gen).items() if not k.startswith("head")} for _ in range(2)]
    for s in sent:
        assert p.offer(ref(), encode(s)) is None
    outcome = p.finish()
    assert outcome.aggregate.record == {"members": 2}
    for member, s in zip(outcome.aggregate.members, sent, strict=True):
        assert list(member) == list(base)
        assert torch.equal(member["head.weight"], base["head.weight"])
        assert torch.equal(member["body.weight"], s["body.weight"])


def test_job_spec_reads_the_job_and_refuses_a_bad_one():
    """The job's fields become an AggregationSpec; a bad parameter or regex is a JobRejected."""
    job = AggregateRound(
        job_id=uuid4(),
        training_id=uuid4(),
        round=1,
        method="fedprox",
        params={"mu": 0.5},
        update_kind="delta",
        exclude_vars="^bn",
        max_update_norm=3.0,
        base_model_id=uuid4(),
        base_blob_key="sha256/x",
        updates=(),
    )
    spec = job_spec(job)
    assert (spec.method, spec.params, spec.update_kind, spec.exclude_vars, spec.max_update_norm) == (
        AggregationMethod.FEDPROX,
        {"mu": 0.5},
        "delta",
        "^bn",
        3.0,
    )
    with pytest.raises(JobRejected, match="mu"):
        job_spec(replace(job, params={"mu": -1}))
    with pytest.raises(JobRejected, match="exclude_vars"):
        job_spec(replace(job, exclude_vars="("))
    with pytest.raises(JobRejected, match="unknown aggregation method 'nope'"):
        job_spec(replace(job, method="nope"))


def test_update_tensors_are_views_of_the_decoded_bytes(gen):
    """Decoding an update copies nothing: each tensor points into the bytes msgpack handed back."""
    state = model(gen)
    records = decode_tensors(encode(state))
    views = update_views(records)
    for r in records:
        tensor = views[r.name]
        assert tensor.data_ptr() == np.frombuffer(r.data, dtype=np.uint8).ctypes.data
        assert torch.equal(tensor, state[r.name])


class CountingBlobStore(LocalBlobStore):
    """A local store that records the most blobs one read asked for."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.most_in_flight = 0

    async def get(self, key: str) -> bytes:
        """Count a single read."""
        self.most_in_flight = max(self.most_in_flight, 1)
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Count the batch."""
        self.most_in_flight = max(self.most_in_flight, len(keys))
        return await super().get_many(keys)


async def test_feed_reads_small_updates_in_batches_within_the_byte_budget(
    gen, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small updates are read several at a time, never more bytes at once than the budget, and
    offered in order: a rejected one in the middle is named, the rest are aggregated."""
    base = model(gen)
    blobs = CountingBlobStore(tmp_path)
    refs = [ref(num_examples=i + 1) for i in range(40)]
    size = 0
    for i, r in enumerate(refs):
        data = b"not msgpack" if i == 17 else encode({k: v.clone() for k, v in base.items()})
        size = max(size, len(data))
        await blobs.put(r.blob_key, data)
    monkeypatch.setattr(rounds, "FEED_BYTES", 5 * size)
    p = pipeline(base)
    await feed(p, refs, blobs)
    assert 1 < blobs.most_in_flight <= 5, "batched reads, within the budget"
    assert [r.update_id for r in p.accepted] == [r.update_id for r in refs if r is not refs[17]]
    assert [r.ref.update_id for r in p.rejected] == [refs[17].update_id]
    assert p.seconds["read"] > 0


# Fold windows -----------------------------------------------------------------------------------------


class WindowLog(FedAvg):
    """FedAvg that records how many updates each `add_many` gets."""

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self.windows: list[int] = []

    def add_many(self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """Record the window's size, then fold it."""
        self.windows.append(len(updates))
        super().add_many(updates, weights)


class DPWindowLog(DPFedAvg):
    """DP-FedAvg that records how many updates each `add_many` gets."""

    def __init__(self, ctx: RoundContext, params: MethodParams) -> None:
        super().__init__(ctx, params)
        self.windows: list[int] = []

    def add_many(self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """Record the window's size, then fold it."""
        self.windows.append(len(updates))
        super().add_many(updates, weights)


def offer_round(p: RoundPipeline, refs: list[UpdateRef], blobs: list[bytes]) -> list[str | None]:
    """Offer every update; the rejection reasons (None: accepted)."""
    return [p.offer(r, b) for r, b in zip(refs, blobs, strict=True)]


@pytest.mark.parametrize("window", [2, 3, 4, 16])
def test_fold_windows_give_the_one_by_one_model_bit_for_bit(gen, window):
    """A windowed round (rejections in the middle, a partial last window) gives exactly the model
    of folding each update as it comes, with the same accepted and rejected updates; the method
    never gets more than `window` updates at once."""
    base = model(gen)
    refs = [ref(num_examples=3 + i) for i in range(9)]
    blobs = [encode(model(gen)) for _ in refs]
    blobs[2] = b"not msgpack"
    blobs[5] = encode({"body.weight": torch.zeros(5, 4)})  # missing tensors
    spec = AggregationSpec(method="fedavg")
    one = RoundPipeline(spec, base, device=CPU, seed=0, method_cls=WindowLog, fold_window=1)
    many = RoundPipeline(spec, base, device=CPU, seed=0, method_cls=WindowLog, fold_window=window)
    reasons = offer_round(one, refs, blobs)
    assert offer_round(many, refs, blobs) == reasons
    assert [r is None for r in reasons].count(False) == 2
    a, b = one.finish(), many.finish()
    assert a.accepted == b.accepted and a.rejected == b.rejected
    for name, tensor in a.aggregate.model.items():
        assert torch.equal(b.aggregate.model[name], tensor), name
    assert isinstance(one.method, WindowLog) and isinstance(many.method, WindowLog)
    assert one.method.windows == [1] * 7
    assert max(many.method.windows) <= window
    assert sum(many.method.windows) == 7
    assert many.method.windows[:-1] == [window] * (len(many.method.windows) - 1)


def test_a_batch_partial_folds_the_held_window_first(gen):
    """partial() of a batch part folds the updates still held: they all count."""
    base = model(gen)
    p = RoundPipeline(AggregationSpec(), base, device=CPU, seed=0, fold_window=4)
    for _ in range(3):
        assert p.offer(ref(), encode(model(gen))) is None
    assert p.partial().num_added == 3


def test_a_method_with_a_transform_gets_one_update_at_a_time(gen):
    """DP-FedAvg clips each update (a transform): no window is held, whatever fold_window says."""
    base = {"w": torch.zeros(4), "b": torch.zeros(2)}
    p = RoundPipeline(
        AggregationSpec(method="dp_fedavg", params={"clip_norm": 5.0, "noise_multiplier": 0.0}),
        base,
        device=CPU,
        seed=0,
        method_cls=DPWindowLog,
        fold_window=4,
    )
    for i in range(3):
        update = {"w": torch.full((4,), float(i + 1)), "b": torch.zeros(2)}
        assert p.offer(ref(), encode(update)) is None
    assert isinstance(p.method, DPWindowLog)
    assert p.method.windows == [1, 1, 1]
    assert p.finish().aggregate.record["num_clipped"] == 1  # norms 2, 4 and 6 against 5


def test_fold_window_setting_and_its_bounds():
    """FEDHUB_AGGREGATOR_FOLD_WINDOW defaults to the pipeline's window; below 1 is refused."""
    assert AggregatorSettings().fold_window == DEFAULT_FOLD_WINDOW
    assert AggregatorSettings(FEDHUB_AGGREGATOR_FOLD_WINDOW=8).fold_window == 8
    with pytest.raises(ValueError, match="fold_window"):
        RoundPipeline(AggregationSpec(), {"w": torch.zeros(1)}, device=CPU, seed=0, fold_window=0)


async def stored_round(
    gen: torch.Generator, blobs: LocalBlobStore, updates: int
) -> tuple[AggregateRound, bytes]:
    """A FedAvg job over a stored base model and `updates` stored updates; the base's bytes."""
    base_bytes = encode(model(gen))
    await blobs.put("model/base", base_bytes)
    refs = [ref(num_examples=i + 1) for i in range(updates)]
    for r in refs:
        await blobs.put(r.blob_key, encode(model(gen)))
    job = AggregateRound(
        job_id=uuid4(),
        training_id=uuid4(),
        round=1,
        base_model_id=uuid4(),
        base_blob_key="model/base",
        method="fedavg",
        updates=tuple(refs),
    )
    return job, base_bytes


async def test_aggregate_round_with_a_window_equals_one_by_one(gen, tmp_path):
    """The whole round from blobs, windowed or not: the same model, bit for bit."""
    blobs = LocalBlobStore(tmp_path)
    job, _ = await stored_round(gen, blobs, 6)
    refs = list(job.updates)
    one = await aggregate_round(job, blobs, CPU, fold_window=1)
    four = await aggregate_round(job, blobs, CPU, fold_window=4)
    assert one.accepted == four.accepted == tuple(refs)
    for name, tensor in one.aggregate.model.items():
        assert torch.equal(four.aggregate.model[name], tensor), name


@pytest.mark.parametrize("updates", [6, 600])
async def test_a_small_round_is_computed_on_the_loop_a_large_one_in_threads(
    gen: torch.Generator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, updates: int
) -> None:
    """Model bytes times updates within `INLINE_WORK_BYTES`: decoding, checks and aggregation run on
    the event loop (no thread hop); beyond it each step goes to a worker thread. Same model either way."""
    blobs = LocalBlobStore(tmp_path)
    job, base_bytes = await stored_round(gen, blobs, updates)
    refs = list(job.updates)
    hops: list[str] = []
    real = threads.asyncio.to_thread

    async def counting(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(threads.asyncio, "to_thread", counting)
    outcome = await aggregate_round(job, blobs, CPU)
    small = rounds.runs_inline(len(base_bytes), updates)
    assert small is (updates == 6)
    work = [h for h in hops if h not in ("read_bytes", "_read_all")]  # the blob store's own reads
    if small:
        assert work == []
    else:
        assert work[:2] == ["decode_state_dict", "RoundPipeline"] and work[-1] == "finish"
        assert set(work[2:-1]) == {"_offer_all"}
    assert outcome.accepted == tuple(refs)
    assert set(outcome.aggregate.model) == set(model(gen))
