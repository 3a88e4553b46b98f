"""The codec: every message class round-trips through an envelope; tensors of every dtype bit for bit;
malformed payloads and unfit tensors raise named errors."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import numpy as np
import pytest
import torch

from shared import events
from shared.bus import envelope_for
from shared.codec import (
    DTYPE_ITEMSIZE,
    FLOAT_DTYPES,
    TensorRecord,
    decode_document,
    decode_message,
    decode_tensors,
    encode_tensors,
    packb,
)
from shared.errors import MalformedPayload, NonFiniteValues, TensorSpecMismatch, UnsupportedDtype
from shared.events import MESSAGE_TYPES, Message
from shared.tensors import (
    check_against_spec,
    first_non_finite,
    from_torch,
    records_to_state_dict,
    spec_of,
    state_dict_to_records,
)

# --- messages ---------------------------------------------------------------------------------

_T, _C, _U = uuid4(), uuid4(), uuid4()

SAMPLES: dict[type[Message], Message] = {
    events.StartTraining: events.StartTraining(training_id=_T, requested_by=uuid4()),
    events.CancelTraining: events.CancelTraining(training_id=_T, requested_by=uuid4()),
    events.UpdateReceived: events.UpdateReceived(
        training_id=_T, round=2, client_id=_C, update_id=_U, num_examples=128
    ),
    events.TestMetricsReceived: events.TestMetricsReceived(
        training_id=_T, round=2, client_id=_C, num_examples=64
    ),
    events.UpdatesReceived: events.UpdatesReceived(
        training_id=_T,
        round=2,
        updates=(
            events.ReceivedUpdate(client_id=_C, update_id=_U, num_examples=128),
            events.ReceivedUpdate(client_id=uuid4(), update_id=uuid4(), num_examples=3),
        ),
    ),
    events.TestReportsReceived: events.TestReportsReceived(
        training_id=_T, round=2, reports=(events.ReceivedTestReport(client_id=_C, num_examples=64),)
    ),
    events.AggregateRound: events.AggregateRound(
        job_id=uuid4(),
        training_id=_T,
        round=2,
        method="fedavg",
        base_model_id=uuid4(),
        base_blob_key="sha256/" + "ab" * 32,
        updates=(
            events.UpdateRef(update_id=_U, client_id=_C, blob_key=f"update/{_U}", num_examples=128),
            events.UpdateRef(update_id=uuid4(), client_id=uuid4(), blob_key="update/x", num_examples=3),
        ),
        delete_updates_after=False,
        params={"server_lr": 0.5, "beta1": 0.8},
        update_kind="delta",
        exclude_vars=r"\.num_batches_tracked$",
        max_update_norm=12.5,
        base_state_blob_key="sha256/" + "ef" * 32,
    ),
    events.AggregatePart: events.AggregatePart(
        round_job=events.AggregateRound(
            job_id=uuid4(),
            training_id=_T,
            round=2,
            method="median",
            base_model_id=uuid4(),
            base_blob_key="sha256/" + "ab" * 32,
            updates=(events.UpdateRef(update_id=_U, client_id=_C, blob_key=f"update/{_U}", num_examples=7),),
            exclude_vars="^bn",
        ),
        part=1,
        parts=3,
        tensors=("fc.weight", "fc.bias"),
    ),
    events.CombineParts: events.CombineParts(job_id=uuid4(), training_id=_T, round=2, parts=3),
    events.ModelAggregated: events.ModelAggregated(
        job_id=uuid4(),
        training_id=_T,
        round=2,
        model_id=uuid4(),
        blob_key="sha256/" + "cd" * 32,
        num_updates=2,
        num_examples=131,
        num_rejected=1,
        rejected=(uuid4(),),
    ),
    events.AggregationFailed: events.AggregationFailed(
        job_id=uuid4(), training_id=_T, round=2, reason="update 1 of client 2: blob does not exist"
    ),
    events.NotificationIssued: events.NotificationIssued(
        event_id=uuid4(),
        notification_type=events.NotificationType.UPDATE_ROUND_START,
        training_id=_T,
        receivers=(_C, uuid4()),
        body={"round": 2, "global_model_uuid": str(uuid4()), "nested": {"ok": [1, 2.5, None, "x"]}},
        issued_at=datetime(2024, 5, 17, 12, 30, 1, 123456, tzinfo=UTC),
    ),
}
"""One sample per message class; a new class without one fails `test_every_message_class_has_a_sample`."""


def test_every_message_class_has_a_sample():
    """MESSAGE_TYPES and SAMPLES name the same classes (the registry is derived from the class tree)."""
    missing = sorted(name for name, cls in MESSAGE_TYPES.items() if cls not in SAMPLES)
    assert not missing, f"message classes without a sample in SAMPLES: {', '.join(missing)}"
    assert set(SAMPLES) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda cls: cls.__name__)
def test_message_round_trips_through_an_envelope(cls):
    """envelope_for + decode_message by the envelope's type gives back an equal message."""
    sample = SAMPLES[cls]
    envelope = envelope_for(sample)
    assert envelope.type == cls.__name__
    assert envelope.routing_key == cls.routing_key
    decoded = decode_message(MESSAGE_TYPES[envelope.type], envelope.body)
    assert type(decoded) is cls
    assert decoded == sample


def test_envelope_keeps_given_ids():
    """A message id and correlation id given to envelope_for are the envelope's."""
    message_id, correlation_id = uuid4(), uuid4()
    envelope = envelope_for(
        SAMPLES[events.StartTraining], message_id=message_id, correlation_id=correlation_id
    )
    assert (envelope.message_id, envelope.correlation_id) == (message_id, correlation_id)
    assert (
        envelope_for(SAMPLES[events.StartTraining]).message_id
        != envelope_for(SAMPLES[events.StartTraining]).message_id
    )


def test_message_defaults_fill_fields_an_older_sender_left_out():
    """A body without a defaulted field (an older producer) decodes with the default."""
    body = packb({"job_id": uuid4(), "training_id": _T, "round": 1, "reason": "x"})
    failed = decode_message(events.AggregationFailed, body)
    assert isinstance(failed, events.AggregationFailed)
    assert failed.reason == "x"
    job = SAMPLES[events.AggregateRound]
    raw = packb(
        {name: getattr(job, name) for name in job.__dataclass_fields__ if name != "delete_updates_after"}
    )
    decoded = decode_message(events.AggregateRound, raw)
    assert isinstance(decoded, events.AggregateRound)
    assert decoded.delete_updates_after is True


def test_an_aggregation_job_from_before_the_spec_fields_decodes_as_plain_fedavg():
    """A job or announcement written before the aggregation spec existed gets its fields' defaults."""
    job = SAMPLES[events.AggregateRound]
    new = {"params", "update_kind", "exclude_vars", "max_update_norm", "base_state_blob_key"}
    raw = packb({name: getattr(job, name) for name in job.__dataclass_fields__ if name not in new})
    decoded = decode_message(events.AggregateRound, raw)
    assert isinstance(decoded, events.AggregateRound)
    assert (decoded.params, decoded.update_kind, decoded.exclude_vars) == ({}, "weights", None)
    assert (decoded.max_update_norm, decoded.base_state_blob_key) == (None, None)
    done = SAMPLES[events.ModelAggregated]
    raw = packb(
        {n: getattr(done, n) for n in done.__dataclass_fields__ if n not in ("num_rejected", "rejected")}
    )
    announced = decode_message(events.ModelAggregated, raw)
    assert isinstance(announced, events.ModelAggregated)
    assert (announced.num_rejected, announced.rejected) == (0, ())


@pytest.mark.parametrize(
    ("body", "says"),
    [(b"\xc1", "not valid msgpack"), (b"\x92\x01", "not valid msgpack"), (packb([1, 2]), "not a map")],
    ids=["reserved-byte", "truncated", "array"],
)
def test_malformed_message_body_is_named(body, says):
    """A body that is not a msgpack map raises MalformedPayload naming the message class."""
    with pytest.raises(MalformedPayload, match=says) as info:
        decode_message(events.StartTraining, body)
    assert "StartTraining" in info.value.detail


# --- tensors ----------------------------------------------------------------------------------


def every_dtype_state() -> dict[str, torch.Tensor]:
    """A tensor of every supported dtype with its edge values, plus 0-d, empty and strided tensors."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 65504.0])
    state: dict[str, torch.Tensor] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        name = str(dtype).removeprefix("torch.")
        state[name] = torch.cat([torch.randn(3, 4, generator=gen).reshape(-1), special]).to(dtype).reshape(19)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        info = torch.iinfo(dtype)
        name = str(dtype).removeprefix("torch.")
        body = torch.randint(info.min, info.max, (2, 3), generator=gen, dtype=dtype).reshape(-1)
        state[name] = torch.cat([body, torch.tensor([info.min, info.max, 0], dtype=dtype)])
    state["bool"] = torch.tensor([[True, False, True], [False, False, True]])
    state["scalar.float32"] = torch.tensor(3.25)
    state["scalar.int64"] = torch.tensor(-(2**62), dtype=torch.int64)
    state["scalar.bool"] = torch.tensor(True)
    state["empty.float16"] = torch.zeros(0, 3, dtype=torch.float16)
    state["empty.int8"] = torch.zeros(0, dtype=torch.int8)
    state["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    return state


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, row-major."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_every_dtype_is_covered():
    """The sample state holds every dtype the codec carries."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in every_dtype_state().values()}
    assert dtypes == set(DTYPE_ITEMSIZE)


def test_tensors_round_trip_bit_for_bit():
    """state dict -> records -> bytes -> records -> state dict is exact: names, order, dtypes, bits."""
    state = every_dtype_state()
    data = encode_tensors(state_dict_to_records(state))
    records = decode_tensors(data)
    assert [r.name for r in records] == list(state)
    back = records_to_state_dict(records)
    for name, tensor in state.items():
        got = back[name]
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        # NaN != NaN, so compare the raw bits where the values may hold one.
        if tensor.dtype.is_floating_point:
            assert torch.equal(bits(got), bits(tensor)), name
            finite = torch.isfinite(tensor)
            assert torch.equal(got[finite], tensor[finite]), name
        else:
            assert torch.equal(got, tensor), name


def test_records_carry_little_endian_c_order_bytes():
    """The wire bytes of a record are the tensor's values, little-endian, row-major."""
    record = from_torch("w", torch.tensor([[1, 2], [3, 256]], dtype=torch.int32).t())
    assert record.shape == (2, 2)
    assert bytes(record.data) == np.array([[1, 3], [2, 256]], dtype="<i4").tobytes()
    assert spec_of([record]) == {"w": ("int32", (2, 2))}


def _tensor_doc(**fields: object) -> bytes:
    spec = {"dtype": "float32", "shape": [2], "data": b"\x00" * 8, **fields}
    return packb({"tensors": {"w": spec}})


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        (b"\xc1\xc1", MalformedPayload, "not valid msgpack"),
        (b"\x81", MalformedPayload, "not valid msgpack"),
        (packb([1, 2, 3]), MalformedPayload, "must be a msgpack map"),
        (packb({"other": 1}), MalformedPayload, "'tensors' must be a non-empty map"),
        (packb({"tensors": {}}), MalformedPayload, "'tensors' must be a non-empty map"),
        (packb({"tensors": {"w": [1, 2]}}), MalformedPayload, "'w' must be a map"),
        (
            packb({"tensors": {"": {"dtype": "float32", "shape": [], "data": b"\0" * 4}}}),
            MalformedPayload,
            "name",
        ),
        (_tensor_doc(data=b"\x00" * 7), MalformedPayload, "7 bytes of data for shape \\[2\\]"),
        (_tensor_doc(shape=[3], data=b"\x00" * 8), MalformedPayload, "expected 12"),
        (_tensor_doc(dtype="complex64"), UnsupportedDtype, "'complex64' is not supported"),
        (_tensor_doc(dtype=5), MalformedPayload, "'dtype' must be a string"),
        (_tensor_doc(shape="2"), MalformedPayload, "'shape' must be a list"),
        (_tensor_doc(shape=2), MalformedPayload, "'shape' must be a list"),
        (_tensor_doc(shape=[-2]), MalformedPayload, "non-negative"),
        (_tensor_doc(shape=[2.0]), MalformedPayload, "'shape' must be a list"),
        (_tensor_doc(data=[0, 0]), MalformedPayload, "'data' must be raw bytes"),
    ],
    ids=[
        "not-msgpack",
        "truncated",
        "not-a-map",
        "no-tensors",
        "empty-tensors",
        "tensor-not-a-map",
        "empty-name",
        "short-data",
        "long-data",
        "unknown-dtype",
        "dtype-not-a-string",
        "shape-a-string",
        "shape-an-int",
        "negative-dim",
        "float-dim",
        "data-not-bytes",
    ],
)
def test_malformed_tensor_payloads_raise_named_errors(data, error, says):
    """Each malformed document raises its named error, with a detail that says what is wrong."""
    with pytest.raises(error, match=says):
        decode_tensors(data)


def test_decode_document_refuses_non_maps():
    """decode_document returns maps and refuses anything else by name."""
    assert decode_document(packb({"a": 1})) == {"a": 1}
    with pytest.raises(MalformedPayload):
        decode_document(packb("text"))


# --- finiteness and spec checks ---------------------------------------------------------------


def _record(name: str, tensor: torch.Tensor) -> TensorRecord:
    return from_torch(name, tensor)


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
def test_first_non_finite_finds_nan_and_inf_in_every_float_dtype(dtype, bad):
    """The first floating tensor holding NaN or +/-Inf is named; finite ones before it are passed."""
    torch_dtype = getattr(torch, dtype)
    finite = torch.tensor([1.0, -2.0, 0.0, 1e-3]).to(torch_dtype)
    poisoned = torch.tensor([1.0, bad, 3.0]).to(torch_dtype)
    records = [_record("ok", finite), _record("bad", poisoned), _record("later", poisoned)]
    assert first_non_finite(records) == "bad"
    assert first_non_finite([_record("ok", finite)]) is None


def test_first_non_finite_handles_extremes_and_empties():
    """Largest finite values, subnormals, 0-d and empty float tensors are all finite."""
    records = [
        _record("max16", torch.tensor([65504.0, -65504.0], dtype=torch.float16)),
        _record("maxbf", torch.tensor([3.3895e38], dtype=torch.bfloat16)),
        _record("max64", torch.tensor([1.7976931348623157e308], dtype=torch.float64)),
        _record("subnormal", torch.tensor([1e-45])),
        _record("scalar", torch.tensor(0.5)),
        _record("empty", torch.zeros(0)),
    ]
    assert first_non_finite(records) is None


def test_first_non_finite_ignores_integer_tensors():
    """Integer and bool tensors whose bits would read as NaN/Inf as floats are never flagged."""
    records = [
        _record("i32", torch.tensor([0x7FC00000, 0x7F800000], dtype=torch.int32)),
        _record("i16", torch.tensor([-1, 0x7C00], dtype=torch.int16)),
        _record("i64", torch.tensor([-1, 0x7FF0_0000_0000_0000], dtype=torch.int64)),
        _record("u8", torch.tensor([255], dtype=torch.uint8)),
        _record("b", torch.tensor([True])),
    ]
    assert first_non_finite(records) is None


SPEC = {"w": ("float32", (2, 3)), "b": ("float32", (3,)), "n": ("int64", ())}


def _model(**override: torch.Tensor) -> list[TensorRecord]:
    tensors = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.tensor(0), **override}
    return [from_torch(name, t) for name, t in tensors.items()]


def test_check_against_spec_accepts_a_matching_model():
    """A model with the spec's names, dtypes and shapes, all finite, passes."""
    check_against_spec(_model(), SPEC)


@pytest.mark.parametrize(
    ("records", "error", "named"),
    [
        (_model(b=torch.zeros(3, dtype=torch.float64)), TensorSpecMismatch, "'b': dtype float64"),
        (_model(w=torch.zeros(3, 2)), TensorSpecMismatch, "'w': shape \\[3, 2\\]"),
        (_model(n=torch.zeros(1, dtype=torch.int64)), TensorSpecMismatch, "'n': shape \\[1\\]"),
        ([*_model(), from_torch("extra", torch.zeros(1))], TensorSpecMismatch, "unknown tensor names: extra"),
        (_model()[:2], TensorSpecMismatch, "missing tensor names: n"),
        (_model(b=torch.tensor([0.0, float("nan"), 0.0])), NonFiniteValues, "'b'"),
    ],
    ids=["dtype", "shape", "scalar-shape", "unknown", "missing", "non-finite"],
)
def test_check_against_spec_errors_name_the_tensor(records, error, named):
    """Every mismatch raises its named error, naming the tensor at fault."""
    with pytest.raises(error, match=named):
        check_against_spec(records, SPEC)


def test_check_against_spec_partial_allows_left_out_tensors_only():
    """partial=True accepts a subset of the spec but still refuses unknown names."""
    check_against_spec(_model()[:1], SPEC, partial=True)
    with pytest.raises(TensorSpecMismatch, match="unknown"):
        check_against_spec([from_torch("extra", torch.zeros(1))], SPEC, partial=True)
