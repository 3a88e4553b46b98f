"""The numpy engine for small FedAvg rounds: the torch pipeline's outcome bit for bit, without torch."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from typing import Any
from uuid import uuid4

import numpy as np
import pytest
import torch

from services.aggregator import small
from services.aggregator.pipeline import RoundPipeline
from services.aggregator.rounds import JobRejected
from services.aggregator.small import SmallRound, takes
from shared.aggregation import AggregationSpec
from shared.codec import TensorRecord, encode_tensors
from shared.events import AggregateRound, UpdateRef
from shared.tensors import from_numpy, records_to_state_dict, spec_of, state_dict_to_records

CPU = torch.device("cpu")


def model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Every dtype the numpy engine takes, in shapes with vector tails (7 x 13, 33) and a scalar."""
    return {
        "fc.weight": (rng.standard_normal((7, 13)) * scale).astype(np.float32),
        "fc.bias": (rng.standard_normal(33) * scale).astype(np.float32),
        "scalar": np.array(rng.standard_normal() * scale, dtype=np.float32),
        "half": (rng.standard_normal((5, 9)) * scale).astype(np.float16),
        "head.weight": rng.standard_normal((2, 3)).astype(np.float32),
        "steps": np.array(rng.integers(0, 10**6), dtype=np.int64),
        "counts": rng.integers(-128, 128, 11).astype(np.int8),
        "pixels": rng.integers(0, 256, (4, 4)).astype(np.uint8),
        "mask": rng.integers(0, 2, 3).astype(np.bool_),
    }


def records(tensors: dict[str, np.ndarray]) -> list[TensorRecord]:
    return [from_numpy(k, v) for k, v in tensors.items()]


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    return encode_tensors(records(tensors))


def delta(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the SDK uploads with update_kind=delta (integers wrap, bool is xor)."""
    return {
        k: np.logical_xor(v, base[k]) if v.dtype == np.bool_ else np.subtract(v, base[k], dtype=v.dtype)
        for k, v in new.items()
    }


def ref(num_examples: int) -> UpdateRef:
    update_id = uuid4()
    return UpdateRef(
        update_id=update_id, client_id=uuid4(), blob_key=f"update/{update_id}", num_examples=num_examples
    )


def both(base: dict[str, np.ndarray], spec: AggregationSpec) -> tuple[SmallRound, RoundPipeline]:
    """The numpy round and the torch pipeline over the same base."""
    torch_base = records_to_state_dict(records(base))
    return SmallRound(spec, records(base)), RoundPipeline(spec, torch_base, device=CPU, seed=1)


def torch_model_records(pipeline: RoundPipeline) -> list[TensorRecord]:
    return state_dict_to_records(pipeline.finish().aggregate.model)


def assert_same_bytes(ours: list[TensorRecord], theirs: list[TensorRecord]) -> None:
    assert [(r.name, r.dtype, r.shape) for r in ours] == [(r.name, r.dtype, r.shape) for r in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert bytes(a.data) == bytes(b.data), a.name


@pytest.mark.parametrize("updates", [1, 2, 9, 40])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_the_numpy_round_is_the_torch_round_bit_for_bit(updates, kind):
    """Random updates and weights (zeros among them), every dtype, both upload kinds: the same bytes
    as the torch pipeline, tensor by tensor, and the same updates taken."""
    rng = np.random.default_rng(updates * 10 + (kind == "delta"))
    base = model(rng)
    spec = AggregationSpec(update_kind=kind, exclude_vars=r"^head\.")
    ours, theirs = both(base, spec)
    for i in range(updates):
        new = {k: v for k, v in model(rng).items() if not k.startswith("head.")}
        data = encode(delta(new, base) if kind == "delta" else new)
        r = ref(int(rng.integers(0, 60)) if i else 17)
        assert ours.offer(r, data) is None
        assert theirs.offer(r, data) is None
    assert_same_bytes(ours.finish(), torch_model_records(theirs))
    assert ours.accepted == theirs.accepted


@pytest.mark.parametrize("seed", range(40))
def test_random_models_and_weights_match_torch_bit_for_bit(seed):
    """Random tensor counts, shapes (scalars, vector tails), dtypes and weights (zeros, ties: equal
    weights make the second step's weight exactly 0.5, torch's switch between its two lerp forms)."""
    rng = np.random.default_rng(1000 + seed)
    dtypes = ["float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]
    shapes = {
        f"t{i}": tuple(int(d) for d in rng.integers(1, 9, size=rng.integers(0, 3)))
        for i in range(int(rng.integers(1, 5)))
    }
    kinds = {name: str(rng.choice(dtypes)) for name in shapes}

    def random_model() -> dict[str, np.ndarray]:
        out = {}
        for name, shape in shapes.items():
            kind = kinds[name]
            if kind.startswith("float"):
                out[name] = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(kind)
            elif kind == "bool":
                out[name] = rng.integers(0, 2, shape).astype(np.bool_)
            else:
                info = np.iinfo(kind)
                out[name] = rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(kind)
        return out

    base = random_model()
    spec = AggregationSpec(update_kind=str(rng.choice(["weights", "delta"])))
    ours, theirs = both(base, spec)
    equal = bool(rng.integers(0, 2))
    for _ in range(int(rng.integers(1, 12))):
        new = random_model()
        data = encode(delta(new, base) if spec.update_kind.value == "delta" else new)
        r = ref(7 if equal else int(rng.choice([0, 1, 2, 3, 50, 1000])))
        assert ours.offer(r, data) == theirs.offer(r, data)
    if not ours.accepted or all(a.num_examples == 0 for a in ours.accepted):
        return  # nothing to average: covered by the failure test below
    assert_same_bytes(ours.finish(), torch_model_records(theirs))


def test_rejections_are_the_torch_pipelines_with_the_same_reasons():
    """Excluded tensors sent, a wrong shape, NaN, an oversized norm, undecodable bytes, a missing blob:
    the same updates are left out for the same reasons, and the model is the same."""
    rng = np.random.default_rng(5)
    base = model(rng)
    spec = AggregationSpec(exclude_vars=r"^head\.", max_update_norm=50.0)
    ours, theirs = both(base, spec)

    def kept(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in tensors.items() if not k.startswith("head.")}

    good = kept(model(rng))
    wrong_shape = {**good, "fc.bias": np.zeros(32, np.float32)}
    nan = {**good, "half": np.full((5, 9), np.nan, np.float16)}
    far = kept(model(rng, scale=100.0))
    cases: list[bytes | None] = [
        encode(good),
        encode(model(rng)),  # sends head.weight
        encode(wrong_shape),
        encode(nan),
        encode(far),
        b"\xc1 not msgpack",
        None,
        encode(kept(model(rng))),
    ]
    reasons = []
    for data in cases:
        r = ref(int(rng.integers(1, 30)))
        reason = ours.offer(r, data)
        assert reason == theirs.offer(r, data)
        reasons.append(reason)
    assert reasons[0] is None and reasons[-1] is None
    assert all(reasons[1:-1]), reasons
    assert "exclude_vars" in reasons[1] and "shape" in reasons[2] and "NaN" in reasons[3]
    assert "max_update_norm" in reasons[4] and "does not exist" in reasons[6]
    assert [r.reason for r in ours.rejected] == [r.reason for r in theirs.rejected]
    assert_same_bytes(ours.finish(), torch_model_records(theirs))


def test_a_round_without_usable_updates_fails_as_the_torch_one_does():
    """Nothing accepted, or only zero weights: JobRejected naming why, with the rejections kept."""
    rng = np.random.default_rng(6)
    base = model(rng)
    ours, _ = both(base, AggregationSpec())
    assert ours.offer(ref(3), None) is not None
    with pytest.raises(JobRejected, match="no update could be aggregated") as caught:
        ours.finish()
    assert len(caught.value.rejected) == 1
    zero, _ = both(base, AggregationSpec())
    assert zero.offer(ref(0), encode(model(rng))) is None
    with pytest.raises(JobRejected, match="total weight of 0"):
        zero.finish()


def test_one_update_comes_back_unchanged_and_identical_updates_average_to_themselves():
    """Edge cases of FedAvg: one client, or every client sending the same model."""
    rng = np.random.default_rng(7)
    base, update = model(rng), model(rng)
    one, _ = both(base, AggregationSpec())
    one.offer(ref(5), encode(update))
    same, _ = both(base, AggregationSpec())
    for n in (3, 8, 1, 20):
        same.offer(ref(n), encode(update))
    expected = records(update)
    assert_same_bytes(one.finish(), expected)
    assert_same_bytes(same.finish(), expected)


def job(**fields: Any) -> AggregateRound:
    defaults: dict[str, Any] = {"method": "fedavg", "base_blob_key": "model/x", "updates": ()}
    return AggregateRound(
        job_id=uuid4(), training_id=uuid4(), round=1, base_model_id=uuid4(), **{**defaults, **fields}
    )


def test_which_rounds_the_numpy_engine_takes():
    """FedAvg and FedProx without state over small models of its dtypes; anything else goes to torch."""
    spec = spec_of(records(model(np.random.default_rng(8))))
    limit = 1024
    assert takes(job(), AggregationSpec(), spec, 900, limit)
    assert takes(
        job(method="fedprox"), AggregationSpec(method="fedprox", params={"mu": 0.1}), spec, 900, limit
    )
    assert not takes(job(), AggregationSpec(), spec, 1025, limit)  # too large
    assert not takes(job(), AggregationSpec(), spec, 900, 0)  # turned off
    assert not takes(job(method="median"), AggregationSpec(method="median"), spec, 900, limit)
    assert not takes(job(base_state_blob_key="state/x"), AggregationSpec(), spec, 900, limit)
    for dtype in ("float64", "bfloat16"):
        assert not takes(job(), AggregationSpec(), {**spec, "x": (dtype, (2,))}, 900, limit)


def exact_fma32(a: float, b: float, c: float) -> np.float32:
    """``a * b + c`` rounded once to float32 (ties to even), from exact rational arithmetic."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = np.float32(float(exact))
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    best = min(candidates, key=lambda x: (abs(Fraction(float(x)) - exact), int(x.view(np.uint32)) & 1))
    return np.float32(best)


def test_the_emulated_fma_rounds_once():
    """`_fma32` is the correctly rounded fma: on a case where rounding the float64 sum first lands on
    a float32 tie (plain float64 arithmetic rounds the wrong way), and on random operands."""
    a = np.float32(64 * (1 + 2**-23))
    b = np.float32(1 - 2**-23)
    c = np.float32(2**30 + 2**7)
    naive = np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    ours = small._fma32(a, np.array([b], np.float32), np.array([c], np.float32))[0]
    assert ours == exact_fma32(float(a), float(b), float(c)) == c
    assert naive != c  # the case double rounding gets wrong
    rng = np.random.default_rng(9)
    bs = rng.standard_normal(2000).astype(np.float32)
    cs = (rng.standard_normal(2000) * 10.0 ** rng.integers(-8, 8, 2000)).astype(np.float32)
    for w in (np.float32(0.3), np.float32(-0.7), np.float32(1e-7)):
        got = small._fma32(w, bs, cs)
        want = [exact_fma32(float(w), float(x), float(y)) for x, y in zip(bs, cs, strict=True)]
        assert got.tobytes() == np.array(want, np.float32).tobytes()


def test_the_aggregator_service_imports_no_torch():
    """The numpy engine, the handlers and the service (and the embedded runner) load without torch."""
    code = (
        "import sys, fedhub.embedded, services.aggregator.service, services.aggregator.small; "
        "sys.exit('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or "torch was imported"
