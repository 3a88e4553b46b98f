"""Small FedAvg rounds in numpy: the round pipeline's result, bit for bit, without importing torch.

Most trainings average small models (workload A's MLP is 18 KiB, the demo's the same), where torch
buys no speed and costs its import: ~240 MiB of resident memory and ~2 s in every aggregator
process, the embedded one included. A round this module can do (`SmallRound.handles`: FedAvg or
FedProx, no state, a base model of at most ``FEDHUB_AGGREGATOR_SMALL_ROUND_BYTES``, only float32,
float16, integer and bool tensors) is computed here, on the CPU whatever the device setting; any
other round goes to the torch pipeline, which is imported when the first such round comes.

Same steps and same arithmetic as `services.aggregator.pipeline` with `methods.FedAvg`:

- every update passes `rounds.UpdateCheck` (the same checks and reasons); a delta upload becomes
  ``base + delta`` in the tensor's dtype (integers wrap, bool is xor); ``max_update_norm`` bounds
  the delta's float64 L2 norm over the floating tensors;
- floating tensors keep the running weighted mean in float32,
  ``m_k = lerp(m_{k-1}, x_k, n_k / N_k)``, each step computed as torch's vectorised ``lerp_``
  does it: one fused multiply-add, ``fma(w, x - m, m)`` for ``w < 0.5`` else
  ``fma(w - 1, x - m, x)``, the weight rounded to float32 (`_lerp`); the mean is cast back to the
  tensor's dtype (round to nearest even);
- integer and bool tensors keep the float64 sum ``sum_k n_k x_k``; the mean is rounded to the
  nearest integer (ties to even), or thresholded at half the weight for bool;
- a zero-weight update is counted but never accumulated; weights are the updates' example counts.

numpy has no fused multiply-add: `_fma32` computes it exactly in float64 (a float32 product is
exact there), with the sum rounded to odd (`_round_to_odd`) before the one rounding to float32, so
the result is fma's correctly rounded one (Boldo and Melquiond 2008, "Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd", IEEE Trans. Computers 57(4)).
float64 and bfloat16 tensors go to the torch pipeline: numpy has no bfloat16, and a float64 fma
has no wider type to be emulated in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from services.aggregator.rounds import (
    Intake,
    InvalidWeight,
    JobRejected,
    StoredRound,
    UpdateCheck,
    feed,
    put_records,
    read_blob,
    runs_inline,
)
from shared.aggregation import AggregationMethod, AggregationSpec, UpdateKind
from shared.blobs import BlobStore
from shared.codec import TensorRecord, decode_tensors
from shared.errors import FedhubError
from shared.events import AggregateRound
from shared.tensors import TensorSpec, from_numpy, spec_of
from shared.threads import off_loop

METHODS = frozenset({AggregationMethod.FEDAVG, AggregationMethod.FEDPROX})
"""The methods this module computes: FedAvg and FedProx (FedAvg's server step)."""
DTYPES = frozenset({"float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"})
"""The dtypes it computes exactly as torch does (float64 and bfloat16 go to the torch pipeline)."""

Array = npt.NDArray[Any]


def takes(job: AggregateRound, spec: AggregationSpec, base: TensorSpec, base_bytes: int, limit: int) -> bool:
    """Whether this module computes `job`'s round: FedAvg or FedProx without server state, a base
    model (signature `base`, `base_bytes` stored) of `DTYPES` tensors only and at most `limit`
    bytes (0: never)."""
    return (
        spec.method in METHODS
        and job.base_state_blob_key is None
        and base_bytes <= limit
        and all(dtype in DTYPES for dtype, _ in base.values())
    )


async def run_small_round(job: AggregateRound, spec: AggregationSpec, blobs: BlobStore) -> StoredRound:
    """Run a round `takes` accepted and store its model; `JobRejected` as the torch pipeline would."""
    if not job.updates:
        raise JobRejected("the job lists no updates")
    what = f"base model {job.base_model_id}"
    data = await read_blob(blobs, job.base_blob_key, what)
    try:
        base = decode_tensors(data)
    except FedhubError as exc:
        raise JobRejected(f"{what}: {exc.name}: {exc.detail}") from exc
    round_ = SmallRound(spec, base)
    round_.inline = runs_inline(len(data), len(job.updates))
    await feed(round_, job.updates, blobs)
    model = await off_loop(round_.inline, round_.finish)
    started = time.perf_counter()
    stored = await put_records(blobs, model)
    return StoredRound(
        engine="numpy",
        model=stored,
        state=None,
        members=[],
        accepted=tuple(round_.accepted),
        rejected=tuple(round_.rejected),
        seconds={**round_.seconds, "store": time.perf_counter() - started},
    )


class SmallRound(Intake[dict[str, Array]]):
    """One small FedAvg round: `offer` each update's bytes (see `rounds.Intake`), then `finish`.

    Built over the base model's records; not thread-safe: one caller.
    """

    def __init__(self, spec: AggregationSpec, base: Sequence[TensorRecord]) -> None:
        super().__init__()
        unsupported = sorted({r.dtype for r in base} - DTYPES)
        if unsupported:
            raise JobRejected(f"the numpy engine cannot average {', '.join(unsupported)} tensors")
        self.spec = spec
        self._base = list(base)
        self._check = UpdateCheck.over(spec, spec_of(base))
        self._kept = {r.name: _array(r) for r in base if r.name in self._check.kept}
        self._acc: dict[str, Array] = {}
        self._weight = 0.0

    def prepare(self, records: Sequence[TensorRecord]) -> dict[str, Array]:
        """An update's records as full weights (read-only views of the bytes, or new arrays)."""
        self._check.records(records)
        tensors = {r.name: _array(r) for r in records}
        if self.spec.update_kind is UpdateKind.DELTA:
            if self.spec.max_update_norm is not None:
                self._check.norm(sum(_squares(d) for d in tensors.values()))
            return {name: _plus(base, tensors[name]) for name, base in self._kept.items()}
        if self.spec.max_update_norm is not None:
            self._check.norm(sum(_squares(tensors[name], base) for name, base in self._kept.items()))
        return tensors

    def take(self, update: dict[str, Array], weight: float) -> None:
        """Fold the update into the running means and sums (a zero weight: counted, never folded)."""
        if not math.isfinite(weight) or weight < 0:
            raise InvalidWeight(f"update weight must be a finite number >= 0, got {weight}")
        if weight == 0:
            return  # its values have no influence
        self._weight = total = self._weight + weight
        first = not self._acc
        for name, x in update.items():
            # In place on arrays made here: numpy's operators turn a 0-d array into a scalar.
            if x.dtype.kind == "f":
                if first:
                    self._acc[name] = np.array(x, dtype=np.float32)  # a copy, also for float32
                else:
                    _lerp(self._acc[name], x, weight / total)
            elif first:
                self._acc[name] = acc = np.array(x, dtype=np.float64)
                acc *= weight
            else:
                self._acc[name] += x.astype(np.float64) * weight

    def finish(self) -> list[TensorRecord]:
        """The new global model's records, the base's names in the base's order.

        Raises `JobRejected` when no update was accepted or the accepted ones weigh 0.
        """
        started = time.perf_counter()
        self.require_accepted()
        if self._weight <= 0:
            raise JobRejected(
                f"NothingToAggregate: the {len(self.accepted)} updates added have a total weight of 0",
                self.rejected,
            )
        model = []
        for record in self._base:
            if record.name not in self._kept:
                model.append(record)
                continue
            mean = _mean(self._acc[record.name], self._weight, np.dtype(record.dtype))
            model.append(from_numpy(record.name, np.asarray(mean).reshape(record.shape)))
        self.seconds["aggregate"] += time.perf_counter() - started
        return model


def _array(record: TensorRecord) -> Array:
    """A read-only numpy view of a record's bytes."""
    return np.frombuffer(record.data, dtype=np.dtype(record.dtype)).reshape(record.shape)


def _plus(base: Array, delta: Array) -> Array:
    """``base + delta`` in the tensor's dtype (integers wrap; bool: xor)."""
    if base.dtype == np.bool_:
        return np.asarray(np.logical_xor(base, delta))
    return np.asarray(np.add(base, delta, dtype=base.dtype))


def _squares(value: Array, base: Array | None = None) -> float:
    """The float64 sum of squares of a floating tensor (minus `base`); 0 for other dtypes."""
    if value.dtype.kind != "f":
        return 0.0
    diff = value.astype(np.float64).ravel()
    if base is not None:
        diff -= base.astype(np.float64).ravel()
    return float(np.dot(diff, diff))


def _lerp(acc: Array, x: Array, weight: float) -> None:
    """``acc.lerp_(x, weight)`` as torch's vectorised float32 kernel computes it, in place."""
    w = np.float32(weight)
    end = x.astype(np.float32, copy=False)
    diff = end - acc
    if abs(w) < 0.5:
        acc[...] = _fma32(w, diff, acc)
    else:
        acc[...] = _fma32(w - np.float32(1.0), diff, end)


def _fma32(a: np.float32, b: Array, c: Array) -> Array:
    """``a * b + c`` for float32 operands, rounded once to float32 (see the module doc)."""
    product = np.float64(a) * b.astype(np.float64)  # exact: 24 + 24 bits fit in 53
    addend = c.astype(np.float64)
    total = product + addend
    return _round_to_odd(total, product, addend).astype(np.float32)


def _round_to_odd(total: Array, a: Array, b: Array) -> Array:
    """``a + b`` rounded to odd, from ``total = a + b`` rounded to nearest (float64).

    The sum's rounding error is exact (Knuth's TwoSum); where it is not zero and the rounded sum's
    last bit is even, the sum moves one unit toward the exact value, which makes that bit odd.
    """
    b_virtual = total - a
    error = (a - (total - b_virtual)) + (b - b_virtual)
    even = (total.view(np.uint64) & np.uint64(1)) == 0
    fix = (error != 0) & even
    if fix.any():
        total = np.where(fix, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total


def _mean(acc: Array, weight: float, dtype: np.dtype[Any]) -> Array:
    """The tensor's mean in its dtype, from its accumulator (see the module doc)."""
    if dtype.kind == "f":
        return acc.astype(dtype)
    if dtype == np.bool_:
        return acc >= weight / 2
    return np.rint(acc / weight).astype(dtype)
